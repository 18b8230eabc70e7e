"""The side panels: model (folder, load, generation settings) and camera (preview, Snap, Live).

They only hold widgets and turn them into requests; MainWindow wires them to the worker
and the camera feed.
"""

from __future__ import annotations

import numpy as np
from PySide6.QtCore import Qt
from PySide6.QtGui import QImage, QPixmap
from PySide6.QtWidgets import (QComboBox, QDoubleSpinBox, QFormLayout, QGroupBox, QHBoxLayout, QLabel,
                               QLineEdit, QPlainTextEdit, QProgressBar, QPushButton, QSpinBox, QVBoxLayout)

from edge_vlm.generate import GenerationConfig

from .worker import LoadRequest

MAX_RECENT = 8


class ModelPanel(QGroupBox):
    def __init__(self, recent: list[str], parent=None):
        super().__init__("Model", parent)
        self.setMaximumWidth(320)
        lay = QVBoxLayout(self)
        row = QHBoxLayout()
        self.path = QComboBox(editable=True)
        self.path.addItems(recent)
        self.path.setCurrentText(recent[0] if recent else "")
        self.path.lineEdit().setPlaceholderText("model folder or Hub repo id")
        self.path.setToolTip("A VILA / LLaVA / Llama-family model folder (recently used ones are listed)")
        self.browse = QPushButton("…")
        self.browse.setFixedWidth(28)
        row.addWidget(self.path, 1)
        row.addWidget(self.browse)
        lay.addLayout(row)

        form = QFormLayout()
        self.device = QComboBox()
        self.device.addItems(["auto", "cuda", "cpu"])
        self.max_context = QSpinBox(minimum=0, maximum=131072, singleStep=512, specialValueText="model default")
        form.addRow("Device", self.device)
        form.addRow("Context", self.max_context)
        lay.addLayout(form)
        self.load = QPushButton("Load")
        lay.addWidget(self.load)
        self.progress = QProgressBar()
        self.progress.setRange(0, 0)  # indeterminate until the loader reports its first stage
        self.progress.hide()
        lay.addWidget(self.progress)
        self.info = QLabel("No model loaded.")
        self.info.setWordWrap(True)
        self.info.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        lay.addWidget(self.info)

        gen = QGroupBox("Generation")
        form = QFormLayout(gen)
        self.temperature = QDoubleSpinBox(minimum=0.0, maximum=2.0, singleStep=0.1, value=0.2)
        self.temperature.setToolTip("0 = always the likeliest token")
        self.top_p = QDoubleSpinBox(minimum=0.05, maximum=1.0, singleStep=0.05, value=0.9)
        self.max_new_tokens = QSpinBox(minimum=1, maximum=8192, value=512)
        self.seed = QSpinBox(minimum=-1, maximum=2**31 - 1, value=-1, specialValueText="random")
        self.system = QPlainTextEdit()
        self.system.setPlaceholderText("system prompt (default: the model's)")
        self.system.setFixedHeight(60)
        form.addRow("Temperature", self.temperature)
        form.addRow("Top-p", self.top_p)
        form.addRow("Max new tokens", self.max_new_tokens)
        form.addRow("Seed", self.seed)
        form.addRow(self.system)
        lay.addWidget(gen)
        lay.addStretch(1)

    def load_request(self) -> LoadRequest:
        dev = self.device.currentText()
        return LoadRequest(path=self.path.currentText().strip(), device=None if dev == "auto" else dev,
                           max_context=self.max_context.value() or None, system=self.system_prompt())

    def system_prompt(self) -> str:
        return self.system.toPlainText().strip()

    def gen_config(self) -> GenerationConfig:
        seed = self.seed.value()
        return GenerationConfig(max_new_tokens=self.max_new_tokens.value(), temperature=self.temperature.value(),
                                top_p=self.top_p.value(), seed=None if seed < 0 else seed)

    def show_model(self, model) -> None:
        i = model.info
        vision = f"{i.vision_arch} + {i.projector}, {model.tokens_per_image} tokens/image" if i.vision_arch \
            else "none (text only)"
        params = sum(i.params.values())
        self.info.setText(f"<b>{i.path}</b><br>layout {i.layout}, LLM {i.llm_arch}<br>vision: {vision}<br>"
                          f"{params / 1e6:.1f}M params, quantization {i.quantization}<br>"
                          f"{i.dtype} on {i.device}, context {model.max_context}")


class CameraPanel(QGroupBox):
    SOURCES = ["Camera 0", "Camera 1", "Camera 2", "Camera 3", "Video file…"]

    def __init__(self, parent=None):
        super().__init__("Camera", parent)
        self.setMaximumWidth(300)
        lay = QVBoxLayout(self)
        self.preview = QLabel("camera off")
        self.preview.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.preview.setFixedSize(256, 192)
        self.preview.setStyleSheet("background:#222; color:#bbb;")
        lay.addWidget(self.preview)
        row = QHBoxLayout()
        self.source = QComboBox()
        self.source.addItems(self.SOURCES)
        self.start = QPushButton("Start")
        row.addWidget(self.source, 1)
        row.addWidget(self.start)
        lay.addLayout(row)
        self.snap = QPushButton("Snap: add frame to next question")
        self.snap.setEnabled(False)
        lay.addWidget(self.snap)

        live = QGroupBox("Live: ask about the latest frame")
        form = QFormLayout(live)
        self.live_question = QLineEdit("What do you see? Answer in one sentence.")
        self.live_interval = QDoubleSpinBox(minimum=0.2, maximum=600, value=5.0, suffix=" s", singleStep=1)
        self.live = QPushButton("Live", checkable=True)
        self.live.setEnabled(False)
        self.live_status = QLabel("")
        self.live_status.setWordWrap(True)
        form.addRow("Question", self.live_question)
        form.addRow("Every", self.live_interval)
        form.addRow(self.live)
        form.addRow(self.live_status)
        lay.addWidget(live)
        lay.addStretch(1)

    def set_source_index(self, index: int) -> None:
        self.source.setCurrentIndex(min(max(index, 0), 3))

    def show_frame(self, frame: np.ndarray) -> None:
        h, w, _ = frame.shape
        img = QImage(np.ascontiguousarray(frame).data, w, h, 3 * w, QImage.Format.Format_RGB888).copy()
        self.preview.setPixmap(QPixmap.fromImage(img).scaled(
            self.preview.size(), Qt.AspectRatioMode.KeepAspectRatio, Qt.TransformationMode.SmoothTransformation))

    def show_off(self, text: str = "camera off") -> None:
        self.preview.clear()
        self.preview.setText(text)
