"""The desktop app end to end, offscreen: the real worker thread, the tiny VILA, a fake camera (tests/fakes.py)."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("PySide6")
pytest.importorskip("pytestqt")

from PySide6.QtCore import QSettings, Qt  # noqa: E402

from edge_vlm.apps.desktop.camera import open_camera  # noqa: E402
from edge_vlm.apps.desktop.window import MainWindow  # noqa: E402
from edge_vlm.generate import GenerationConfig  # noqa: E402
from tests.fakes import FakeCamera  # noqa: E402

WAIT_MS = 20000  # generous: CI shares 2 cores; a tiny-model answer takes ~50 ms


def make_window(qtbot, tmp_path, camera_factory=None) -> MainWindow:
    settings = QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)
    win = MainWindow(settings=settings, camera_factory=camera_factory or (lambda src: FakeCamera(fps=120)))
    qtbot.addWidget(win)
    win.model_panel.device.setCurrentText("cpu")
    return win


@pytest.fixture(autouse=True)
def collect_on_the_gui_thread():
    """Collect each test's dead widgets here, on the GUI thread, so that no garbage collection the
    worker thread happens to trigger ever finalizes a Qt object (which crashes Qt)."""
    yield
    import gc

    gc.collect()


# Waits watch the window's own state (set by its slots on the UI thread) rather than the
# worker's signals, which are emitted from the worker thread.
def wait_idle(qtbot, win) -> None:
    qtbot.waitUntil(lambda: not win.busy, timeout=WAIT_MS)


def load(qtbot, win, path) -> None:
    win.model_panel.path.setCurrentText(str(path))
    qtbot.mouseClick(win.model_panel.load, Qt.MouseButton.LeftButton)
    assert win.model_panel.progress.isVisibleTo(win.model_panel)  # shown while loading
    wait_idle(qtbot, win)
    assert win.model is not None, win.error.text()
    assert not win.model_panel.progress.isVisibleTo(win.model_panel)


def ask(qtbot, win, text, images=(), max_new_tokens=24, seed=0):
    for im in images:
        win.add_attachment(im)
    win.model_panel.max_new_tokens.setValue(max_new_tokens)
    win.model_panel.seed.setValue(seed)
    win.prompt.setPlainText(text)
    pieces = []
    win.worker.piece.connect(pieces.append, Qt.ConnectionType.DirectConnection)
    win.last_stats = None
    qtbot.mouseClick(win.send, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, win)
    win.worker.piece.disconnect(pieces.append)
    assert win.last_stats is not None, win.error.text()
    return win.last_stats, pieces


@pytest.fixture
def win(qtbot, tmp_path, tiny_vila):
    w = make_window(qtbot, tmp_path)
    load(qtbot, w, tiny_vila)
    yield w
    w.shutdown()


def photo():
    from skimage import data

    return data.chelsea()


def test_load_shows_model_info_and_remembers_it(win, tiny_vila):
    bar = win.model_panel.progress  # the last stage reported is the projector, complete
    assert bar.maximum() > 0 and bar.value() == bar.maximum() and bar.format().startswith("loading projector")
    info = win.model_panel.info.text()
    assert "vila" in info and "llama" in info and "siglip" in info and "cpu" in info
    assert win.settings.value("recent_models", [], list)[0] == str(tiny_vila)
    assert re.fullmatch(r"RAM \d+\.\d\d GiB", win.mem_label.text())


def test_streamed_answer_is_the_sessions_answer(win, qtbot, tiny_vila):
    """The window shows exactly what the runtime answers (same seed), streamed in several pieces."""
    from edge_vlm import ChatSession, load_model

    stats, pieces = ask(qtbot, win, "What is in this picture?", [photo()], max_new_tokens=30, seed=3)
    turns = win.chat.conversation.turns
    assert [t.role for t in turns] == ["user", "assistant"]
    assert len(turns[0].images) == 1 and turns[0].images[0].size == (451, 300)
    reference = ChatSession(load_model(tiny_vila, device="cpu", progress=False)).answer(
        "What is in this picture?", images=[photo()], gen=GenerationConfig(max_new_tokens=30, temperature=0.2,
                                                                          top_p=0.9, seed=3))
    assert turns[1].text == "".join(pieces) == reference
    assert len(pieces) > 3
    assert stats.new_tokens == 30
    assert re.fullmatch(r"TTFT \d+ ms", win.ttft_label.text())
    assert re.fullmatch(r"\d+\.\d tok/s", win.speed_label.text())
    assert "30 tokens" in turns[1].stats
    assert win.attachments == [] and win.prompt.toPlainText() == ""
    shown = win.chat.toPlainText()
    assert "What is in this picture?" in shown and "copy" in shown


def test_stop_ends_generation_at_once(win, qtbot):
    # Hold the worker right after its first piece (a direct connection runs in the worker thread),
    # so Stop is pressed while the answer is provably still being generated.
    first, release = threading.Event(), threading.Event()
    tokens_at_stop = []

    def hold(_piece):
        if not first.is_set():
            tokens_at_stop.append(win.worker.session.stats.new_tokens)
            first.set()
            release.wait(10)

    win.worker.piece.connect(hold, Qt.ConnectionType.DirectConnection)
    win.model_panel.max_new_tokens.setValue(300)
    win.prompt.setPlainText("Describe the image.")
    win.add_attachment(photo())
    qtbot.mouseClick(win.send, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(first.is_set, timeout=WAIT_MS)
    assert win.stop.isEnabled() and not win.send.isEnabled()
    qtbot.mouseClick(win.stop, Qt.MouseButton.LeftButton)
    release.set()
    wait_idle(qtbot, win)
    stats = win.last_stats
    assert stats.stop_reason == "stopped"
    # 300 were allowed; the first piece can take a few tokens (partial UTF-8 is held back),
    # after it at most the token already being sampled is added.
    assert stats.new_tokens <= tokens_at_stop[0] + 1 < 300
    assert win.chat.conversation.turns[-1].stats.endswith("stopped")
    assert win.send.isEnabled() and not win.stop.isEnabled()
    stats, _ = ask(qtbot, win, "And now?", max_new_tokens=5)  # the chat goes on after a stop
    assert stats.new_tokens == 5


def test_regenerate_replaces_the_answer_from_the_same_context(win, qtbot):
    ask(qtbot, win, "Hello", max_new_tokens=8, seed=1)
    first, _ = ask(qtbot, win, "What is in this picture?", [photo()], max_new_tokens=20, seed=5)
    answer = win.chat.conversation.turns[-1].text
    position = win.worker.session.engine.position
    qtbot.mouseClick(win.regenerate, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, win)
    turns = win.chat.conversation.turns
    assert [t.role for t in turns] == ["user", "assistant", "user", "assistant"]
    # Same seed, same rewound context: the same answer, and the cache did not grow by a turn.
    assert turns[-1].text == answer
    assert win.worker.session.engine.position == position
    assert len(win.worker.session.messages) == 4


def test_new_chat_clears_conversation_and_context(win, qtbot):
    ask(qtbot, win, "Hello", max_new_tokens=4)
    assert win.worker.session.engine.position > 0
    qtbot.mouseClick(win.new_chat, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: win.worker.session.engine.position == 0, timeout=WAIT_MS)
    assert win.chat.conversation.turns == [] and win.worker.session.messages == []


def test_snap_attaches_the_current_frame(win, qtbot):
    assert win.start_camera(0)
    qtbot.waitUntil(lambda: win.feed.captured > 3, timeout=WAIT_MS)
    qtbot.waitUntil(lambda: win.camera_panel.preview.pixmap() is not None
                    and not win.camera_panel.preview.pixmap().isNull(), timeout=WAIT_MS)
    qtbot.mouseClick(win.camera_panel.snap, Qt.MouseButton.LeftButton)
    assert len(win.attachments) == 1
    frame = np.asarray(win.attachments[0])
    assert frame.shape == (96, 128, 3)
    n = FakeCamera.frame_number(frame)
    assert np.array_equal(frame, FakeCamera.frame(n))  # a real camera frame, unaltered
    ask(qtbot, win, "What do you see?", max_new_tokens=4)
    assert len(win.chat.conversation.turns[0].images) == 1


def wait_for_frames(feed, n: int) -> None:
    """Block until the feed has captured `n` frames (fail after WAIT_MS); safe off the GUI thread."""
    deadline = time.monotonic() + WAIT_MS / 1000
    while feed.captured < n:
        assert time.monotonic() < deadline, f"the camera did not reach {n} frames"
        time.sleep(0.005)


def test_live_mode_asks_about_the_newest_frame_and_drops_stale_ones(win, qtbot):
    assert win.start_camera(0)
    qtbot.waitUntil(lambda: win.feed.captured > 0, timeout=WAIT_MS)
    position = win.worker.session.engine.position
    # Each Live answer ends only once the camera has delivered two newer frames than the one asked
    # about (answered runs in the worker thread, before the window sees the answer): so the next
    # tick has a stale frame to drop on any machine, not only when the camera outruns the model.
    feed = win.feed
    two_more = lambda stats, req: wait_for_frames(feed, req.tag + 2)  # noqa: E731 - req.tag: the seq asked
    win.worker.answered.connect(two_more, Qt.ConnectionType.DirectConnection)
    win.model_panel.max_new_tokens.setValue(6)
    win.camera_panel.live_interval.setValue(0.2)
    win.camera_panel.live.setChecked(True)
    qtbot.waitUntil(lambda: len(win.live_asked) >= 3 and not win.busy, timeout=WAIT_MS)
    win.camera_panel.live.setChecked(False)
    win.worker.answered.disconnect(two_more)
    asked = list(win.live_asked)
    assert all(b > a + 1 for a, b in zip(asked, asked[1:]))  # frames in between were skipped
    seq, _ = feed.latest()
    untaken = 0 if feed._taken_index + 1 == seq else 1
    assert feed.dropped + feed.taken + untaken == feed.captured  # every frame taken once, or dropped
    assert feed.dropped > 0
    live = [t for t in win.chat.conversation.turns if t.live]
    users = [t for t in live if t.role == "user"]
    assert len(users) == len(asked)
    for seq, turn in zip(asked, users):  # each question carried the newest frame of its tick
        assert FakeCamera.frame_number(np.asarray(turn.images[0])) == seq - 1
    assert all(t.text for t in live if t.role == "assistant")
    assert win.worker.session.engine.position == position  # Live questions do not fill the context

    # A tick while an answer is being generated is skipped, not queued.
    first, release = threading.Event(), threading.Event()

    def hold(_piece):
        if not first.is_set():
            first.set()
            release.wait(10)

    win.worker.piece.connect(hold, Qt.ConnectionType.DirectConnection)
    n_asked, n_skipped = len(win.live_asked), win.live_skipped  # timer ticks during answers were skipped too
    win.live_tick()
    qtbot.waitUntil(first.is_set, timeout=WAIT_MS)
    qtbot.wait(50)  # frames keep arriving meanwhile
    win.live_tick()
    win.live_tick()
    release.set()
    wait_idle(qtbot, win)
    assert win.live_skipped == n_skipped + 2 and len(win.live_asked) == n_asked + 1


def test_save_reopen_and_export_markdown(win, qtbot, tmp_path):
    ask(qtbot, win, "What is in this picture?", [photo()], max_new_tokens=12)
    ask(qtbot, win, "Say more.", max_new_tokens=6)
    saved = win.chat.conversation
    win.save_conversation(tmp_path / "chat1")
    data = json.loads((tmp_path / "chat1" / "conversation.json").read_text())
    assert [t["role"] for t in data["turns"]] == ["user", "assistant", "user", "assistant"]
    assert data["turns"][0]["images"] == ["images/000-0.png"]

    qtbot.mouseClick(win.new_chat, Qt.MouseButton.LeftButton)
    win.open_conversation(tmp_path / "chat1")
    wait_idle(qtbot, win)
    turns = win.chat.conversation.turns
    assert [t.text for t in turns[:4]] == [t.text for t in saved.turns]
    assert np.array_equal(np.asarray(turns[0].images[0]), photo())
    assert turns[-1].role == "note"
    shown = win.chat.toPlainText()
    assert "Say more." in shown and shown.count("Assistant") == 2 and "remembers these 2 exchanges" in shown
    assert win.worker.session.messages[2]["content"] == "Say more."

    md = win.export_markdown(tmp_path / "out" / "chat.md") if (tmp_path / "out").mkdir() is None else None
    text = md.read_text()
    assert "![image 1](chat_images/000-0.png)" in text
    assert np.array_equal(np.asarray(__import__("PIL.Image").Image.open(md.parent / "chat_images" / "000-0.png")),
                          photo())
    assert "### You" in text and "### Assistant" in text and "Say more." in text


# ---- error paths: a readable message in the window, the app keeps running, nothing typed is lost ----

def test_invalid_model_folder(qtbot, tmp_path, tiny_vila):
    win = make_window(qtbot, tmp_path)
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    win.prompt.setPlainText("my unsent question")
    win.model_panel.path.setCurrentText(str(bad))
    qtbot.mouseClick(win.model_panel.load, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, win)
    assert win.error.isVisibleTo(win) and win.model is None
    assert "unsupported model type" in win.error.text() and str(bad) in win.error.text()
    assert win.prompt.toPlainText() == "my unsent question"
    assert win.model_panel.load.isEnabled() and not win.model_panel.progress.isVisibleTo(win)
    qtbot.mouseClick(win.send, Qt.MouseButton.LeftButton)  # no model: a message, the question is kept
    assert "no model loaded" in win.error.text()
    assert win.prompt.toPlainText() == "my unsent question"
    load(qtbot, win, tiny_vila)  # the app still works
    assert not win.error.isVisibleTo(win)
    win.shutdown()


def test_no_camera(qtbot, tmp_path):
    win = make_window(qtbot, tmp_path, camera_factory=open_camera)  # the real OpenCV path
    win.prompt.setPlainText("typed")
    assert not win.start_camera(7)  # no /dev/video7 here
    assert "no camera found at index 7" in win.error.text()
    assert win.feed is None and not win.camera_panel.snap.isEnabled()
    assert win.prompt.toPlainText() == "typed"
    win.shutdown()


def _write_video(path: Path, n: int) -> Path:
    import cv2

    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 50, (128, 96))
    assert out.isOpened()
    for i in range(n):
        out.write(FakeCamera.frame(i)[:, :, ::-1].copy())
    out.release()
    return path


@pytest.mark.parametrize("source", ["fake", "video"])
def test_camera_unplugged_mid_stream(qtbot, tmp_path, source):
    if source == "fake":
        win = make_window(qtbot, tmp_path, camera_factory=lambda s: FakeCamera(fps=100, unplug_after=10))
        arg = 0
    else:  # a real video file through OpenCV: when it ends, the source is gone like an unplugged camera
        win = make_window(qtbot, tmp_path, camera_factory=open_camera)
        arg = str(_write_video(tmp_path / "clip.avi", 10))
    win.prompt.setPlainText("typed")
    win.add_attachment(photo())
    assert win.start_camera(arg)
    qtbot.waitUntil(lambda: bool(win.error.text()), timeout=WAIT_MS)
    assert "stopped delivering frames" in win.error.text()
    assert win.feed is None and win.camera_panel.preview.text() == "no signal"
    assert win.prompt.toPlainText() == "typed" and len(win.attachments) == 1
    assert win.start_camera(0 if source == "fake" else arg)  # it can be started again
    win.shutdown()


def test_out_of_memory_while_answering(win, qtbot):
    """A CUDA OOM cannot be provoked safely on a CPU runner, so the session raises the exact
    exception torch raises for it; what is tested is the app's handling of it."""
    import torch

    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        yield  # a generator, like the real ask()

    win.worker.session.ask = oom
    win.prompt.setPlainText("What is in this picture?")
    win.add_attachment(photo())
    qtbot.mouseClick(win.send, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, win)
    assert "out of memory" in win.error.text() and "context length" in win.error.text()
    assert win.prompt.toPlainText() == "What is in this picture?"  # the question comes back
    assert len(win.attachments) == 1  # with its image
    assert win.chat.conversation.turns == [] and win.send.isEnabled()
    del win.worker.session.ask
    stats, _ = ask(qtbot, win, "What is in this picture?", max_new_tokens=3)
    assert stats.new_tokens == 3 and not win.error.isVisibleTo(win)


def test_context_overflow_is_a_message(win, qtbot):
    win.prompt.setPlainText("word " * 2000)
    qtbot.mouseClick(win.send, Qt.MouseButton.LeftButton)
    wait_idle(qtbot, win)
    assert "fit in the context" in win.error.text()
    assert win.prompt.toPlainText() == ("word " * 2000).strip()


def test_closing_while_generating_stops_cleanly(qtbot, tmp_path, tiny_vila):
    win = make_window(qtbot, tmp_path)
    load(qtbot, win, tiny_vila)
    started = threading.Event()
    stats_seen = []
    win.worker.piece.connect(lambda _p: started.set(), Qt.ConnectionType.DirectConnection)
    win.worker.answered.connect(lambda s, r: stats_seen.append(s.stop_reason), Qt.ConnectionType.DirectConnection)
    win.model_panel.max_new_tokens.setValue(100000)  # would run until the context is full
    win.prompt.setPlainText("Describe the image.")
    qtbot.mouseClick(win.send, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(started.is_set, timeout=WAIT_MS)
    win.close()
    assert win.thread_.isFinished()
    assert stats_seen in (["stopped"], ["context_full"])  # stopped, or it had just run out of room


def test_screenshot(qtbot, tmp_path, tiny_vila):
    """Render the window with a real streamed answer; docs/screenshot.png when asked to."""
    want = os.environ.get("EDGE_VLM_WRITE_SCREENSHOT") == "1"
    model_dir = tiny_vila
    if want:  # the README's picture: a real LLM (SmolLM2) writes the text; the vision tower is random
        from edge_vlm.benchmarks.real_model import smollm2_folder
        from tests.factories import make_vila

        model_dir = tmp_path / "vila-smollm2"
        make_vila(model_dir, llm_folder=smollm2_folder(), image_size=384, hidden_size=64,
                  intermediate_size=96, num_hidden_layers=3)
    win = make_window(qtbot, tmp_path)
    win.resize(1280, 760)
    win.show()
    load(qtbot, win, model_dir)
    assert win.start_camera(0)
    qtbot.waitUntil(lambda: win.camera_panel.preview.pixmap() is not None
                    and not win.camera_panel.preview.pixmap().isNull(), timeout=WAIT_MS)
    ask(qtbot, win, "What is in this picture?", [photo()], max_new_tokens=60, seed=7)
    win.model_panel.max_new_tokens.setValue(24)
    win.live_tick()  # one Live answer about the newest camera frame
    wait_idle(qtbot, win)
    assert win.chat.conversation.turns[-1].live and win.chat.conversation.turns[-1].text
    win.prompt.setPlainText("Is there a cat on the sofa?")
    qtbot.wait(100)
    image = win.grab().toImage()
    out = Path(__file__).resolve().parents[2] / "docs" / "screenshot.png" if want else tmp_path / "shot.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    assert image.save(str(out))
    assert image.width() >= 1200 and image.height() >= 700
    colors = {image.pixel(x, y) for x in range(0, image.width(), 7) for y in range(0, image.height(), 7)}
    assert len(colors) > 200  # the photo, the camera preview and text are in it, not a blank window
    win.shutdown()


def test_images_by_paste_and_drop_and_enter_sends(win, qtbot, tmp_path):
    from PIL import Image
    from PySide6.QtCore import QMimeData, QPointF, QUrl
    from PySide6.QtGui import QDropEvent, QImage

    rgb = np.ascontiguousarray(photo())
    mime = QMimeData()
    mime.setImageData(QImage(rgb.data, rgb.shape[1], rgb.shape[0], 3 * rgb.shape[1],
                             QImage.Format.Format_RGB888).copy())
    win.prompt.insertFromMimeData(mime)  # what Ctrl+V does with an image on the clipboard
    assert len(win.attachments) == 1 and np.array_equal(np.asarray(win.attachments[0]), rgb)
    assert win.prompt.toPlainText() == ""

    Image.fromarray(rgb).save(tmp_path / "cat.png")
    (tmp_path / "notes.txt").write_text("not an image")
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(tmp_path / "cat.png")), QUrl.fromLocalFile(str(tmp_path / "notes.txt"))])
    win.dropEvent(QDropEvent(QPointF(10, 10), Qt.DropAction.CopyAction, mime, Qt.MouseButton.LeftButton,
                             Qt.KeyboardModifier.NoModifier))
    assert len(win.attachments) == 2 and "2 images attached" in win.attach_label.text()

    qtbot.keyClicks(win.prompt, "Two cats?")
    qtbot.keyClick(win.prompt, Qt.Key.Key_Return, Qt.KeyboardModifier.ShiftModifier)  # a new line, not sent
    assert not win.busy and win.prompt.toPlainText() == "Two cats?\n"
    qtbot.keyClick(win.prompt, Qt.Key.Key_Return)
    wait_idle(qtbot, win)
    user = win.chat.conversation.turns[0]
    assert user.text == "Two cats?" and len(user.images) == 2 and win.attachments == []


def test_copy_button_and_system_prompt(qtbot, tmp_path, tiny_vila):
    from PySide6.QtCore import QUrl
    from PySide6.QtGui import QGuiApplication

    win = make_window(qtbot, tmp_path)
    win.model_panel.system.setPlainText("You are terse.")
    load(qtbot, win, tiny_vila)
    assert win.worker.session.system == "You are terse."
    ask(qtbot, win, "Hello", max_new_tokens=6)
    assert win.worker.session.messages[0]["content"] == "Hello"
    win.chat.anchorClicked.emit(QUrl("copy:1"))  # the "copy" link of the answer
    assert QGuiApplication.clipboard().text() == win.chat.conversation.turns[1].text
    win.shutdown()


def test_live_keeps_a_reduced_copy_of_large_frames(qtbot, tmp_path, tiny_vila):
    win = make_window(qtbot, tmp_path, camera_factory=lambda s: FakeCamera(fps=30, size=(720, 1280)))
    load(qtbot, win, tiny_vila)
    assert "RAM" in win.model_panel.info.text()
    assert win.start_camera(0)
    qtbot.waitUntil(lambda: win.feed.captured > 0, timeout=WAIT_MS)
    win.model_panel.max_new_tokens.setValue(3)
    win.live_tick()
    wait_idle(qtbot, win)
    user = win.chat.conversation.turns[0]
    assert user.live and user.images[0].size == (480, 270)  # 1280x720 kept at 480 px
    win.shutdown()


def test_reopened_conversation_continues_as_if_never_closed(win, qtbot, tmp_path):
    """After reopening, the model's context equals that of the whole conversation rendered at once:
    the next greedy answer matches one computed from the full prompt by the runtime directly."""
    from edge_vlm.apps.desktop.conversation import Conversation
    from edge_vlm import ChatSession
    from edge_vlm.text.templates import IMAGE_MARK
    import torch

    from edge_vlm.generate import AnswerText, generate
    from edge_vlm.backends.torch_engine import TorchEngine

    conv = Conversation()
    conv.add("user", "What is in this picture?", [photo()])
    conv.add("assistant", "A cat sits on a red sofa next to a window.")
    conv.add("user", "What do you see?", [FakeCamera.frame(3)], live=True)  # live: not replayed
    conv.add("assistant", "A desk.", live=True)
    conv.add("user", "Is there a car?")
    conv.add("assistant", "no")
    conv.save(tmp_path / "c")
    win.open_conversation(tmp_path / "c")
    wait_idle(qtbot, win)
    assert "remembers these 2 exchanges" in win.chat.conversation.turns[-1].text
    win.model_panel.temperature.setValue(0.0)
    stats, _ = ask(qtbot, win, "Where is the person?", max_new_tokens=12)
    answer = win.chat.conversation.turns[-1].text

    model = win.worker.model
    msgs = [{"role": "user", "content": IMAGE_MARK + "\nWhat is in this picture?"},
            {"role": "assistant", "content": "A cat sits on a red sofa next to a window."},
            {"role": "user", "content": "Is there a car?"}, {"role": "assistant", "content": "no"},
            {"role": "user", "content": "Where is the person?"}]
    chunks = [model.tokenizer.encode(c) for c in model.template.render(msgs).split(IMAGE_MARK)]
    image = model.encode_images([photo()])[0]
    embeds = torch.cat([model.llm.embed(torch.tensor(chunks[0])), image, model.llm.embed(torch.tensor(chunks[1]))])
    engine = TorchEngine(model.llm, model.max_context)
    reference = AnswerText(model.tokenizer, model.eos_token_ids, model.template.stop_strings)
    want = "".join(generate(engine, embeds[None], GenerationConfig(max_new_tokens=12, temperature=0.0), reference))
    assert answer == want
    assert win.worker.session.position == engine.position  # the same tokens are in the cache
    # and the restored context matters: without it the same question gets another answer
    greedy = GenerationConfig(max_new_tokens=12, temperature=0.0)
    assert ChatSession(model).answer("Where is the person?", gen=greedy) != answer


def test_an_internvl_model_answers_about_a_photo_like_its_session(qtbot, tmp_path):
    """A tiled model (InternVL -hf, tiny and random) in the window: the photo is cut into tiles
    and the streamed answer is the runtime's."""
    from edge_vlm import ChatSession, load_model
    from tests.factories import make_internvl_hf

    folder = tmp_path / "internvl"
    make_internvl_hf(folder, seed=5, intermediate_size=64)
    win = make_window(qtbot, tmp_path)
    try:
        load(qtbot, win, folder)
        assert "internvit" in win.model_panel.info.text().lower()
        _, pieces = ask(qtbot, win, "What is in this picture?", [photo()], max_new_tokens=12, seed=4)
        model = load_model(folder, device="cpu", progress=False)
        assert model.tile_count(model.image_tiles(photo_image())[0]) == 1 and model.tile_count(photo_image()) > 1
        reference = ChatSession(model).answer("What is in this picture?", images=[photo()], gen=GenerationConfig(
            max_new_tokens=12, temperature=0.2, top_p=0.9, seed=4))
        assert "".join(pieces) == win.chat.conversation.turns[1].text == reference
    finally:
        win.shutdown()


def photo_image():
    from PIL import Image

    return Image.fromarray(photo())


@pytest.mark.parametrize("kind", ["nvila", "nvila_lite"])
def test_an_nvila_model_answers_about_a_photo_like_its_session(qtbot, tmp_path, kind):
    """NVILA (dynamic S2) and NVILA-Lite (tiles of a lone image) folders, tiny and random, in the window:
    the streamed answer is the runtime's own for the same photo."""
    from edge_vlm import ChatSession, load_model
    from tests.nvila_factory import make_nvila, make_nvila_lite

    folder = tmp_path / kind
    (make_nvila if kind == "nvila" else make_nvila_lite)(folder, seed=6)
    win = make_window(qtbot, tmp_path)
    try:
        load(qtbot, win, folder)
        _, pieces = ask(qtbot, win, "What is in this picture?", [photo()], max_new_tokens=8, seed=4)
        model = load_model(folder, device="cpu", progress=False)
        assert model.image_tokens([photo_image()]) > model.tokens_per_image  # the photo is tiled
        reference = ChatSession(model).answer("What is in this picture?", images=[photo()], gen=GenerationConfig(
            max_new_tokens=8, temperature=0.2, top_p=0.9, seed=4))
        assert "".join(pieces) == win.chat.conversation.turns[1].text == reference
    finally:
        win.shutdown()
