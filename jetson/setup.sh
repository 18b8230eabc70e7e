#!/usr/bin/env bash
# Bare-metal install of edge-vlm on a Jetson Orin with JetPack 6 (L4T r36.x, CUDA 12.6).
#
#   sudo jetson/setup.sh                 # install into /opt/edge-vlm/venv
#   sudo jetson/setup.sh --service       # ... and install + enable the camera service (edge-vlm-camera)
#
# What it does: apt packages (Ubuntu's OpenCV with GStreamer, GStreamer plugins), a venv that
# sees the system OpenCV, PyTorch + Triton + onnxruntime-gpu (CUDA and TensorRT execution providers,
# for the vision tower) built for Jetson, edge-vlm from this checkout, and
# optionally the systemd unit with its settings file /etc/edge-vlm/camera.env.
set -euo pipefail

PREFIX=${PREFIX:-/opt/edge-vlm}
PIP_INDEX=${PIP_INDEX:-https://pypi.jetson-ai-lab.io/jp6/cu126}
TORCH_VERSION=${TORCH_VERSION:-2.8.0}
TRITON_VERSION=${TRITON_VERSION:-3.4.0}
ONNXRUNTIME_VERSION=${ONNXRUNTIME_VERSION:-1.22.0}
ONNX_VERSION=${ONNX_VERSION:-1.18.0}
ONNXSCRIPT_VERSION=${ONNXSCRIPT_VERSION:-0.4.0}
SERVICE_USER=${SERVICE_USER:-edge-vlm}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")

install_service=0
for arg in "$@"; do
    case "$arg" in
        --service) install_service=1 ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "setup.sh: unknown option $arg (try --help)" >&2; exit 2 ;;
    esac
done

if [[ $(id -u) -ne 0 ]]; then
    echo "setup.sh: run as root (sudo $0 $*)" >&2
    exit 1
fi
if [[ ! -f /etc/nv_tegra_release ]]; then
    echo "setup.sh: this is not a Jetson (no /etc/nv_tegra_release); on a PC use: pip install edge-vlm" >&2
    exit 1
fi

echo "== apt packages"
apt-get update
apt-get install -y --no-install-recommends \
    python3-venv python3-pip python3-opencv \
    gstreamer1.0-tools gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad \
    gstreamer1.0-plugins-ugly gstreamer1.0-libav gstreamer1.0-rtsp v4l-utils

echo "== virtual environment in $PREFIX/venv"
mkdir -p "$PREFIX"
# --system-site-packages: the venv uses Ubuntu's cv2, which has GStreamer (pip's has not)
python3 -m venv --system-site-packages "$PREFIX/venv"
PIP="$PREFIX/venv/bin/pip"
"$PIP" install --upgrade pip
"$PIP" install --index-url "$PIP_INDEX" "torch==$TORCH_VERSION" "triton==$TRITON_VERSION" \
    "onnxruntime-gpu==$ONNXRUNTIME_VERSION"
"$PIP" install "onnx==$ONNX_VERSION" "onnxscript==$ONNXSCRIPT_VERSION"
"$PIP" install "$REPO"
"$PIP" uninstall -y opencv-python-headless
"$PREFIX/venv/bin/python" - <<'PY'
import re, cv2, onnxruntime, torch
assert re.search(r"GStreamer:\s+YES", cv2.getBuildInformation()), "OpenCV without GStreamer is first on the path"
assert torch.cuda.is_available(), "this torch build does not see the GPU"
providers = onnxruntime.get_available_providers()
assert "TensorrtExecutionProvider" in providers, f"onnxruntime without TensorRT: {providers}"
print(f"ok: torch {torch.__version__} on {torch.cuda.get_device_name(0)}, OpenCV {cv2.__version__} with GStreamer, "
      f"onnxruntime {onnxruntime.__version__} ({', '.join(providers)})")
PY

if [[ $install_service -eq 1 ]]; then
    echo "== service edge-vlm-camera"
    if ! id "$SERVICE_USER" >/dev/null 2>&1; then
        useradd --system --home-dir /var/lib/edge-vlm --shell /usr/sbin/nologin "$SERVICE_USER"
    fi
    usermod -a -G video,render "$SERVICE_USER" 2>/dev/null || usermod -a -G video "$SERVICE_USER"
    install -d -m 0755 /etc/edge-vlm
    if [[ ! -f /etc/edge-vlm/camera.env ]]; then  # never overwrite the user's settings
        install -m 0644 "$HERE/camera.env" /etc/edge-vlm/camera.env
    fi
    install -m 0644 "$HERE/edge-vlm-camera.service" /etc/systemd/system/edge-vlm-camera.service
    systemctl daemon-reload
    systemctl enable --now edge-vlm-camera.service
    echo "answers: /var/log/edge-vlm/answers.jsonl; status: systemctl status edge-vlm-camera; settings: /etc/edge-vlm/camera.env"
fi
echo "done: $PREFIX/venv/bin/edge-vlm --help"
