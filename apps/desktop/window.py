"""The main window: wires the chat view, the panels, the model worker and the camera feed.

Everything slow happens elsewhere (model: worker thread; camera: capture thread); the UI
thread only moves text and pictures. Errors become a banner in the window, never a crash,
and what the user typed (question, attachments) is kept whenever a request fails.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Callable

from PIL import Image
from PIL.ImageQt import fromqimage
from PySide6.QtCore import QSettings, Qt, QThread, QTimer, Signal
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (QFileDialog, QHBoxLayout, QLabel, QMainWindow, QPlainTextEdit, QPushButton,
                               QSplitter, QVBoxLayout, QWidget)

from edge_vlm.apps.media.frame_sources import FrameSource
from edge_vlm.errors import MediaError
from edge_vlm.imaging.preprocess import IMAGE_SUFFIXES

from .camera import CameraFeed, open_camera
from .chat_view import ChatView
from .conversation import Conversation
from .panels import MAX_RECENT, CameraPanel, ModelPanel
from .worker import AskRequest, ModelWorker, memory_in_use

IMAGE_FILTER = f"Images ({' '.join('*' + s for s in IMAGE_SUFFIXES)})"  # the file dialog offers what loads
LIVE_KEEP_PX = 480  # longest side of the Live frames kept in the conversation


def _reduced(image, side: int) -> Image.Image:
    from edge_vlm.imaging.preprocess import load_image

    im = load_image(image)
    if max(im.size) > side:
        im = im.copy()
        im.thumbnail((side, side))
    return im


class PromptEdit(QPlainTextEdit):
    """The question box: Enter sends (Shift+Enter: new line); pasting an image attaches it."""

    submitted = Signal()
    image_pasted = Signal(object)  # PIL image

    def keyPressEvent(self, e):  # noqa: N802
        if e.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter) and \
                not e.modifiers() & Qt.KeyboardModifier.ShiftModifier:
            self.submitted.emit()
            return
        super().keyPressEvent(e)

    def canInsertFromMimeData(self, source):  # noqa: N802
        return source.hasImage() or super().canInsertFromMimeData(source)

    def insertFromMimeData(self, source):  # noqa: N802
        if source.hasImage():
            self.image_pasted.emit(fromqimage(source.imageData()).convert("RGB"))
            return
        super().insertFromMimeData(source)


class MainWindow(QMainWindow):
    request_load = Signal(object)
    request_ask = Signal(object)
    request_new_chat = Signal(str)
    request_restore = Signal(object, str)

    def __init__(self, settings: QSettings | None = None,
                 camera_factory: Callable[[int | str], FrameSource] = open_camera):
        super().__init__()
        self.setWindowTitle("edge-vlm")
        self.resize(1280, 760)
        self.setAcceptDrops(True)
        self.settings = settings or QSettings("edge-vlm", "desktop")
        self.camera_factory = camera_factory
        self.model = None
        self.busy = False
        self.attachments: list[Image.Image] = []
        self.feed: CameraFeed | None = None
        self._preview_seq = -1
        self.live_asked: list[int] = []  # frame numbers Live mode asked about
        self.live_skipped = 0  # Live ticks that found the model still busy (nothing is queued)
        self.last_stats = None  # GenerationStats of the last answer
        self._reopened_from: str | Path = ""
        self._build()
        self._start_worker()

    # ---- layout -------------------------------------------------------------------------

    def _build(self) -> None:
        recent = self.settings.value("recent_models", [], list) or []
        self.model_panel = ModelPanel([str(r) for r in recent])
        self.camera_panel = CameraPanel()
        self.chat = ChatView()
        self.error = QLabel()
        self.error.setWordWrap(True)
        self.error.setStyleSheet("background:#fde2e1; color:#8b0000; padding:6px; border:1px solid #e0a0a0;")
        self.error.hide()
        self.attach_label = QLabel("")
        self.clear_attach = QPushButton("Remove images")
        self.clear_attach.hide()
        self.prompt = PromptEdit()
        self.prompt.setPlaceholderText("Ask about an image or the camera… "
                                       "(Enter sends, Shift+Enter: new line; paste or drop images)")
        self.prompt.setFixedHeight(80)
        self.attach = QPushButton("Attach image…")
        self.send = QPushButton("Send")
        self.send.setDefault(True)
        self.stop = QPushButton("Stop")
        self.stop.setEnabled(False)
        self.regenerate = QPushButton("Regenerate")
        self.new_chat = QPushButton("New chat")

        col = QVBoxLayout()
        col.addWidget(self.error)
        col.addWidget(self.chat, 1)
        row = QHBoxLayout()
        row.addWidget(self.attach_label, 1)
        row.addWidget(self.clear_attach)
        col.addLayout(row)
        col.addWidget(self.prompt)
        row = QHBoxLayout()
        for b in (self.attach, self.new_chat, self.regenerate):
            row.addWidget(b)
        row.addStretch(1)
        row.addWidget(self.stop)
        row.addWidget(self.send)
        col.addLayout(row)
        center = QWidget()
        center.setLayout(col)
        split = QSplitter()
        split.addWidget(self.model_panel)
        split.addWidget(center)
        split.addWidget(self.camera_panel)
        split.setSizes([260, 720, 280])
        self.setCentralWidget(split)

        self.ttft_label, self.speed_label, self.mem_label = QLabel("TTFT –"), QLabel("– tok/s"), QLabel("")
        for w in (self.ttft_label, self.speed_label, self.mem_label):
            self.statusBar().addPermanentWidget(w)

        menu = self.menuBar().addMenu("&File")
        for text, key, slot in (("&Open conversation…", QKeySequence.StandardKey.Open, self.open_dialog),
                                ("&Save conversation…", QKeySequence.StandardKey.Save, self.save_dialog),
                                ("&Export Markdown…", None, self.export_dialog),
                                ("&Quit", QKeySequence.StandardKey.Quit, self.close)):
            act = QAction(text, self)
            if key is not None:
                act.setShortcut(key)
            act.triggered.connect(slot)
            menu.addAction(act)

        self.model_panel.browse.clicked.connect(self._browse_model)
        self.model_panel.load.clicked.connect(self.load_model)
        self.send.clicked.connect(self.send_question)
        self.prompt.submitted.connect(self.send_question)
        self.prompt.image_pasted.connect(lambda im: self.add_attachment(im))
        self.stop.clicked.connect(self.stop_generation)
        self.regenerate.clicked.connect(self.regenerate_answer)
        self.new_chat.clicked.connect(self.start_new_chat)
        self.attach.clicked.connect(self._attach_dialog)
        self.clear_attach.clicked.connect(self.clear_attachments)
        self.chat.copied.connect(lambda _: self.statusBar().showMessage("answer copied", 2000))
        cp = self.camera_panel
        cp.start.clicked.connect(self._toggle_camera)
        cp.snap.clicked.connect(self.snap)
        cp.live.toggled.connect(self.set_live)
        self.preview_timer = QTimer(self, interval=66)  # ~15 fps preview; polls the newest frame
        self.preview_timer.timeout.connect(self._poll_camera)
        self.live_timer = QTimer(self)
        self.live_timer.timeout.connect(self.live_tick)
        cp.live_interval.valueChanged.connect(lambda s: self.live_timer.setInterval(int(s * 1000)))

    def _start_worker(self) -> None:
        self.thread_ = QThread(self)
        self.worker = ModelWorker()
        self.worker.moveToThread(self.thread_)
        self.request_load.connect(self.worker.load)
        self.request_ask.connect(self.worker.ask)
        self.request_new_chat.connect(self.worker.new_chat)
        self.request_restore.connect(self.worker.restore)
        self.worker.restored.connect(self._on_restored)
        self.worker.loaded.connect(self._on_loaded)
        self.worker.load_failed.connect(self._on_load_failed)
        self.worker.load_progress.connect(self._on_load_progress)
        self.worker.piece.connect(self.chat.append_piece)
        self.worker.answered.connect(self._on_answered)
        self.worker.failed.connect(self._on_failed)
        self.thread_.start()

    # ---- messages -----------------------------------------------------------------------

    def show_error(self, message: str) -> None:
        self.error.setText(f"⚠ {message}")
        self.error.show()
        self.statusBar().showMessage("error: " + message, 10000)

    def clear_error(self) -> None:
        self.error.hide()
        self.error.clear()

    def _set_busy(self, busy: bool) -> None:
        self.busy = busy
        self.send.setEnabled(not busy)
        self.stop.setEnabled(busy)
        self.regenerate.setEnabled(not busy)
        self.new_chat.setEnabled(not busy)
        self.model_panel.load.setEnabled(not busy)

    # ---- model --------------------------------------------------------------------------

    def _browse_model(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Model folder", self.model_panel.path.currentText())
        if folder:
            self.model_panel.path.setCurrentText(folder)

    def load_model(self) -> None:
        req = self.model_panel.load_request()
        if not req.path:
            self.show_error("pick a model folder first")
            return
        self.clear_error()
        self._set_busy(True)
        self.model = None  # the worker frees the old model first: two may not fit in VRAM together
        self.model_panel.progress.setRange(0, 0)
        self.model_panel.progress.show()
        self.model_panel.info.setText(f"Loading {req.path}…")
        self.statusBar().showMessage(f"loading {req.path}…")
        self.request_load.emit(req)

    def _on_load_progress(self, stage: str, done: int, total: int) -> None:
        bar = self.model_panel.progress
        bar.setRange(0, max(total, 1))
        bar.setValue(done)
        bar.setFormat(f"{stage}: %v/%m tensors")

    def _on_loaded(self, model) -> None:
        self.model = model
        self.model_panel.progress.hide()
        self.model_panel.show_model(model)
        self.model_panel.info.setText(self.model_panel.info.text() + f"<br>{memory_in_use(model.device)} in use")
        self._set_busy(False)
        self.chat.conversation.model = model.info.path
        self.mem_label.setText(memory_in_use(model.device))
        self.statusBar().showMessage("model loaded", 3000)
        path = self.model_panel.path.currentText().strip()
        recent = [path] + [r for r in (self.settings.value("recent_models", [], list) or []) if r != path]
        self.settings.setValue("recent_models", recent[:MAX_RECENT])

    def _on_load_failed(self, message: str) -> None:
        self.model_panel.progress.hide()
        self.model_panel.info.setText("No model loaded." if self.worker.model is None else self.model_panel.info.text())
        self.model = self.worker.model
        self._set_busy(False)
        self.show_error(message)

    # ---- asking -------------------------------------------------------------------------

    def add_attachment(self, image) -> None:
        from edge_vlm.imaging.preprocess import load_image

        try:
            self.attachments.append(load_image(image))
        except Exception as e:  # noqa: BLE001 - a bad file is a message, not a crash
            self.show_error(str(e))
        self._show_attachments()

    def clear_attachments(self) -> None:
        self.attachments.clear()
        self._show_attachments()

    def _show_attachments(self) -> None:
        n = len(self.attachments)
        self.attach_label.setText(f"📎 {n} image{'s' if n != 1 else ''} attached to the next question" if n else "")
        self.clear_attach.setVisible(bool(n))

    def _attach_dialog(self) -> None:
        paths, _ = QFileDialog.getOpenFileNames(self, "Attach images", "", IMAGE_FILTER)
        for p in paths:
            self.add_attachment(p)

    def dragEnterEvent(self, e):  # noqa: N802
        if e.mimeData().hasUrls() or e.mimeData().hasImage():
            e.acceptProposedAction()

    def dropEvent(self, e):  # noqa: N802
        md = e.mimeData()
        if md.hasImage():
            self.add_attachment(fromqimage(md.imageData()).convert("RGB"))
        for url in md.urls():
            if url.isLocalFile() and Path(url.toLocalFile()).suffix.lower() in IMAGE_SUFFIXES:
                self.add_attachment(url.toLocalFile())
        e.acceptProposedAction()

    def send_question(self) -> None:
        text = self.prompt.toPlainText().strip()
        if not text or self.busy:
            return
        if self.model is None:
            self.show_error("no model loaded: pick a model folder and press Load")
            return
        images = list(self.attachments)
        self.prompt.clear()
        self.clear_attachments()
        self._ask(AskRequest(text, images, self.model_panel.gen_config()))

    def _ask(self, req: AskRequest) -> None:
        self.clear_error()
        conv = self.chat.conversation
        if not req.regenerate:
            # Live runs for hours: keep a reduced copy of each frame (the model saw the full one).
            kept = [_reduced(im, LIVE_KEEP_PX) for im in req.images] if req.live else req.images
            conv.add("user", req.text, kept, live=req.live)
        conv.add("assistant", "", live=req.live)
        self.chat.streaming_index = len(conv.turns) - 1
        self.chat.render()
        self._set_busy(True)
        self.worker.stop_event.clear()  # here, not in the worker: a Stop pressed at once must not be lost
        self.request_ask.emit(req)

    def _finish_turn(self):
        turn = self.chat.conversation.turns[self.chat.streaming_index]
        self.chat.streaming_index = None
        self._set_busy(False)
        return turn

    def _on_answered(self, stats, req: AskRequest) -> None:
        self.last_stats = stats
        turn = self._finish_turn()
        tps = stats.decode_tokens_per_s
        turn.stats = f"{stats.new_tokens} tokens, TTFT {stats.ttft_s * 1000:.0f} ms, {tps:.1f} tok/s"
        if stats.stop_reason == "stopped":
            turn.stats += ", stopped"
        self.chat.flush()
        self.ttft_label.setText(f"TTFT {stats.ttft_s * 1000:.0f} ms")
        self.speed_label.setText(f"{tps:.1f} tok/s")
        self.mem_label.setText(memory_in_use(self.model.device if self.model is not None else None))

    def _on_failed(self, message: str, req: AskRequest) -> None:
        turn = self._finish_turn()
        conv = self.chat.conversation
        if not turn.text:  # nothing came back: undo the turn and give the question back to the user
            conv.turns.pop()
            if not req.regenerate:
                conv.turns.pop()
                if not req.live:
                    if not self.prompt.toPlainText().strip():
                        self.prompt.setPlainText(req.text)
                    self.attachments = list(req.images) + self.attachments
                    self._show_attachments()
        self.chat.flush()
        self.show_error(message)

    def stop_generation(self) -> None:
        self.worker.stop()  # thread-safe; the generator checks it between tokens

    def regenerate_answer(self) -> None:
        turns = self.chat.conversation.turns
        if self.busy or len(turns) < 2 or turns[-1].role != "assistant" or turns[-2].role != "user" \
                or turns[-1].live or self.model is None:
            return
        turns.pop()
        user = turns[-1]
        self._ask(AskRequest(user.text, list(user.images), self.model_panel.gen_config(), regenerate=True))

    def start_new_chat(self) -> None:
        if self.busy:
            return
        self.request_new_chat.emit(self.model_panel.system_prompt())
        self.chat.set_conversation(Conversation(model=self.model.info.path if self.model else ""))
        self.clear_error()

    # ---- camera -------------------------------------------------------------------------

    def _toggle_camera(self) -> None:
        if self.feed is not None:
            self.stop_camera()
            return
        idx = self.camera_panel.source.currentIndex()
        if idx == len(CameraPanel.SOURCES) - 1:
            path, _ = QFileDialog.getOpenFileName(self, "Video file", "", "Videos (*.mp4 *.avi *.mkv *.mov *.webm)")
            if not path:
                return
            self.start_camera(path)
        else:
            self.start_camera(idx)

    def start_camera(self, source: int | str) -> bool:
        self.stop_camera()
        try:
            feed = CameraFeed(self.camera_factory(source))
            feed.start()
        except MediaError as e:
            self.show_error(str(e))
            return False
        except Exception as e:  # noqa: BLE001 - a driver failure is a message too
            self.show_error(f"cannot open the camera: {e}")
            return False
        self.feed = feed
        self._preview_seq = -1
        self.camera_panel.start.setText("Stop")
        self.camera_panel.snap.setEnabled(True)
        self.camera_panel.live.setEnabled(True)
        self.camera_panel.show_off("starting…")
        self.preview_timer.start()
        return True

    def stop_camera(self, text: str = "camera off") -> None:
        self.camera_panel.live.setChecked(False)
        self.preview_timer.stop()
        if self.feed is not None:
            self.feed.stop()
            self.feed = None
        cp = self.camera_panel
        cp.start.setText("Start")
        cp.snap.setEnabled(False)
        cp.live.setEnabled(False)
        cp.show_off(text)

    def _poll_camera(self) -> None:
        feed = self.feed
        if feed is None:
            return
        if feed.error:
            message = feed.error
            self.stop_camera("no signal")
            self.show_error(message)
            return
        seq, frame = feed.latest()
        if frame is not None and seq != self._preview_seq:
            self._preview_seq = seq
            self.camera_panel.show_frame(frame)

    def snap(self) -> None:
        if self.feed is None:
            return
        _, frame = self.feed.latest()
        if frame is None:
            self.show_error("the camera has not delivered a frame yet")
            return
        self.add_attachment(frame.copy())

    def set_live(self, on: bool) -> None:
        if on and (self.feed is None or self.model is None):
            self.camera_panel.live.setChecked(False)
            self.show_error("Live needs a loaded model and a running camera")
            return
        if on:
            self.live_timer.start(int(self.camera_panel.live_interval.value() * 1000))
            self.camera_panel.live_status.setText("live: waiting for the first tick")
        else:
            self.live_timer.stop()
            self.camera_panel.live_status.setText("")

    def live_tick(self) -> None:
        """Ask the standing question about the newest frame; if the model is busy, skip (never queue)."""
        if self.feed is None:
            return
        if self.busy:
            self.live_skipped += 1
            return
        seq, frame = self.feed.take()
        if frame is None:
            return
        question = self.camera_panel.live_question.text().strip() or "What do you see?"
        self.live_asked.append(seq)
        self.camera_panel.live_status.setText(f"live: asked about frame {seq} at "
                                              f"{datetime.now().strftime('%H:%M:%S')}; "
                                              f"{self.feed.dropped} stale frames dropped")
        self._ask(AskRequest(question, [frame], self.model_panel.gen_config(), live=True, tag=seq))

    # ---- files --------------------------------------------------------------------------

    def save_conversation(self, folder: str | Path) -> Path:
        conv = self.chat.conversation
        conv.system = self.model_panel.system_prompt()
        return conv.save(folder)

    def open_conversation(self, path: str | Path) -> None:
        """Show a saved chat and put it back into the model's context (see ModelWorker.restore)."""
        if self.busy:
            return
        conv = Conversation.load(path)
        self._reopened_from = path
        self.model_panel.system.setPlainText(conv.system)
        self.chat.set_conversation(conv)
        exchanges, turns = [], conv.turns
        for q, a in zip(turns, turns[1:]):  # Live exchanges stood alone, so they are not replayed
            if q.role == "user" and a.role == "assistant" and not q.live and a.text:
                exchanges.append((q.text, list(q.images), a.text))
        self._set_busy(True)
        self.statusBar().showMessage("restoring the conversation into the model's context…")
        self.request_restore.emit(exchanges, conv.system)

    def _on_restored(self, note: str) -> None:
        self._set_busy(False)
        self.chat.conversation.add("note", f"Reopened from {self._reopened_from}: {note}.")
        self.chat.render()

    def export_markdown(self, md_path: str | Path) -> Path:
        return self.chat.conversation.export_markdown(md_path)

    def _file_action(self, fn, path) -> None:
        try:
            fn(path)
            self.statusBar().showMessage(f"{fn.__name__.replace('_', ' ')}: {path}", 4000)
        except Exception as e:  # noqa: BLE001
            self.show_error(str(e))

    def open_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open conversation", "", "Conversation (conversation.json)")
        if path:
            self._file_action(self.open_conversation, path)

    def save_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Save conversation into folder")
        if folder:
            self._file_action(self.save_conversation, folder)

    def export_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export Markdown", "chat.md", "Markdown (*.md)")
        if path:
            self._file_action(self.export_markdown, path)

    # ---- closing ------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop the camera and any answer in progress, then end the worker thread."""
        self.live_timer.stop()
        self.stop_camera()
        self.worker.stop()
        self.thread_.quit()
        self.hide()
        # An answer ends within a token of the stop; a model load cannot be interrupted, so this
        # may wait for it to finish (destroying a running QThread would crash the process).
        self.thread_.wait()

    def closeEvent(self, e):  # noqa: N802
        self.shutdown()
        super().closeEvent(e)
