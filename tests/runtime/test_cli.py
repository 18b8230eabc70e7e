"""The `edge-vlm` command: one-shot and interactive chat, info, help."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from PIL import Image

from edge_vlm.cli import main


def test_chat_one_shot_streams_and_reports_stats(tiny_vila, tmp_path, capsys):
    img = tmp_path / "cat.png"
    from skimage import data

    Image.fromarray(data.chelsea()).save(img)
    code = main(["chat", "--model", str(tiny_vila), "--image", str(img), "--temperature", "0",
                 "--max-new-tokens", "6", "What is this?"])
    out, err = capsys.readouterr()
    assert code == 0 and out.endswith("\n") and len(out) > 1
    assert "time to first token" in err and "tok/s" in err and "peak memory" in err
    code = main(["chat", "--model", str(tiny_vila), "--image", str(img), "--temperature", "0",
                 "--max-new-tokens", "6", "--quiet", "What is this?"])
    again, err = capsys.readouterr()
    assert again == out and err == ""  # greedy is deterministic; --quiet hides the stats


def test_seed_makes_sampling_reproducible(tiny_vila, capsys):
    args = ["chat", "--model", str(tiny_vila), "--temperature", "1.0", "--max-new-tokens", "12", "--quiet"]
    main(args + ["--seed", "3", "hi"])
    a = capsys.readouterr().out
    main(args + ["--seed", "3", "hi"])
    assert capsys.readouterr().out == a


def test_interactive_chat_commands(tiny_vila, tmp_path):
    img = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(img)
    script = f"/image {tmp_path / 'missing.png'}\n/image {img}\nWhat is it?\n/reset\nhello\n/bogus\n/quit\n"
    proc = subprocess.run([sys.executable, "-m", "edge_vlm.cli", "chat", "--model", str(tiny_vila),
                           "--temperature", "0", "--max-new-tokens", "4"], input=script, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "error: image not found" in proc.stderr  # a bad attachment does not end the chat
    assert "(image attached: 1 waiting" in proc.stderr
    assert "(new conversation)" in proc.stderr
    assert proc.stderr.count("tok/s") == 2  # two answers
    assert "commands: /image PATH" in proc.stderr


def test_info_describes_without_loading(tiny_vila, capsys):
    assert main(["info", str(tiny_vila), "--max-context", "1024"]) == 0
    out = capsys.readouterr().out
    for words in ["layout:        vila", "language:      llama, 2 layers", "vision:        siglip, 42px",
                  "projector:     mlp_downsample, 4 tokens per image", "quantization:  none", "KV cache",
                  "at 1024 tokens"]:
        assert words in out, out


def test_kv_cache_option_in_chat_and_info(tiny_vila, capsys, monkeypatch):
    import re

    from edge_vlm.backends.torch_engine import TorchEngine

    built = []
    original = TorchEngine.__init__

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        built.append(self.cache.quantized)

    monkeypatch.setattr(TorchEngine, "__init__", spy)
    assert main(["chat", "--model", str(tiny_vila), "--kv-cache", "int8", "--temperature", "0", "--backend", "torch",
                 "--max-new-tokens", "4", "--quiet", "hi"]) == 0
    assert built == [True] and capsys.readouterr().out.strip()  # an answer, from an int8-cache engine
    gib = {}
    for kind in ("model", "int8"):
        assert main(["info", str(tiny_vila), "--max-context", "2000000", "--kv-cache", kind]) == 0  # a tiny model: big context
        size, unit = re.search(r"KV cache \S+ at \d+ tokens ([\d.]+) (GiB|MiB)", capsys.readouterr().out).groups()
        gib[kind] = float(size) / (1 if unit == "GiB" else 1024)
    assert gib["int8"] < 0.7 * gib["model"]  # llama.cpp on this CPU: Q8_0, 34 bytes per 32 against F16's 64


def test_help_teaches(capsys):
    try:
        main(["chat", "--help"])
    except SystemExit as e:
        assert e.code == 0
    out = capsys.readouterr().out
    for flag in ["--image", "--video", "--temperature", "--top-p", "--seed", "--max-new-tokens", "--system",
                 "/image PATH"]:
        assert flag in out
    assert main([]) == 2
    assert "examples:" in capsys.readouterr().out


def test_chat_and_camera_share_the_generation_options():
    """One definition (edge_vlm.cli.options.add_generation_options): the same flags give the same
    GenerationConfig in both commands; only the defaults differ (the camera: short, greedy answers)."""
    from edge_vlm.cli import build_parser
    from edge_vlm.cli.options import generation_config
    from edge_vlm.generate import GenerationConfig

    parser = build_parser()
    flags = ["--temperature", "0.7", "--top-p", "0.5", "--top-k", "20", "--repetition-penalty", "1.1",
             "--seed", "4", "--max-new-tokens", "9"]
    chat = generation_config(parser.parse_args(["chat", *flags, "hi"]))
    camera = generation_config(parser.parse_args(["camera", "--source", "0", *flags]))
    assert chat == camera == GenerationConfig(max_new_tokens=9, temperature=0.7, top_p=0.5, top_k=20,
                                              repetition_penalty=1.1, seed=4)
    assert generation_config(parser.parse_args(["chat", "hi"])) == GenerationConfig()
    assert generation_config(parser.parse_args(["camera", "--source", "0"])) == GenerationConfig(
        max_new_tokens=64, temperature=0.0)


def test_export_writes_gguf_and_onnx_from_the_command_line(tiny_vila, tmp_path, capsys):
    import gguf
    import onnx

    assert main(["export", "gguf", str(tiny_vila), str(tmp_path / "llm.gguf"), "--outtype", "f32",
                 "--no-progress"]) == 0
    reader = gguf.GGUFReader(tmp_path / "llm.gguf")
    assert any(t.name == "token_embd.weight" for t in reader.tensors)
    assert main(["export", "onnx", str(tiny_vila), str(tmp_path / "onnx"), "--precision", "fp32"]) == 0
    (path,) = (tmp_path / "onnx").glob("*.onnx")
    onnx.checker.check_model(str(path))
    assert main(["export", "gguf", str(tmp_path / "missing"), str(tmp_path / "x.gguf")]) == 1
    assert "x.gguf" not in {p.name for p in tmp_path.iterdir()}  # nothing half-written
    err = capsys.readouterr().err
    assert err.count("edge-vlm: error:") == 1


def test_vision_backend_option_runs_the_tower_on_onnx_runtime(tiny_vila, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EDGE_VLM_CACHE", str(tmp_path / "cache"))
    image = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(image)
    assert main(["chat", "--model", str(tiny_vila), "--vision-backend", "onnx", "--image", str(image),
                 "--temperature", "0", "--max-new-tokens", "3", "What is it?"]) == 0
    err = capsys.readouterr().err
    assert "vision on onnxruntime CPU" in err, err
    assert main(["info", str(tiny_vila), "--vision-backend", "onnx"]) == 0
    assert "vision backend: onnx" in capsys.readouterr().out


def test_vision_int8_option_loads_the_tower_in_int8(tiny_vila):
    from edge_vlm.cli import options as commands
    from edge_vlm.cli import build_parser
    from edge_vlm.formats.int8_rows import Int8Linear

    args = build_parser().parse_args(["chat", "--model", str(tiny_vila), "--device", "cpu",
                                                           "--backend", "torch", "--vision-int8", "hi"])
    model = commands.load_from_args(args)
    assert model.info.vision_quantization == "int8"
    assert any(isinstance(m, Int8Linear) for m in model.vision.modules())
