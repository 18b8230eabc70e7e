"""GStreamer pipeline strings for cameras, streams and files (in) and for annotated video (out).

Every pipeline edge-vlm hands to OpenCV's GStreamer backend is built here, in one tested
place. On a Jetson the strings use the hardware blocks: `nvarguscamerasrc` for CSI
cameras, `nvv4l2decoder` / `nvv4l2h264enc` for H.264/H.265, and `nvvidconv` to leave NVMM
memory; elsewhere the same graph uses the software elements (decodebin, x264enc).
Sources end in `appsink drop=true max-buffers=1` for live input, so GStreamer itself
never queues stale frames.
"""

from __future__ import annotations

from urllib.parse import urlparse

_TO_BGR = "videoconvert ! video/x-raw,format=BGR"
_NVMM_TO_BGR = "nvvidconv ! video/x-raw,format=BGRx ! " + _TO_BGR
_DEPAY = {"h264": "rtph264depay ! h264parse", "h265": "rtph265depay ! h265parse"}


def _appsink(live: bool) -> str:
    # A live source must never block on a slow reader: keep one buffer, drop the rest.
    # A file is read frame by frame, so nothing may be dropped.
    return "appsink drop=true max-buffers=1 sync=false" if live else "appsink sync=false"


def _raw_caps(width: int | None, height: int | None, fps: float | None, memory: str = "") -> str:
    caps = "video/x-raw" + (f"(memory:{memory})" if memory else "")
    if width and height:
        caps += f",width={int(width)},height={int(height)}"
    if fps:
        caps += f",framerate={int(round(fps))}/1"
    return caps


def _quote(location: str) -> str:
    """Quote a location for gst-launch syntax (spaces and '!' must not split the pipeline)."""
    return '"' + location.replace("\\", "\\\\").replace('"', '\\"') + '"'


def source_pipeline(kind: str, location: str, *, jetson: bool, width: int | None = None,
                    height: int | None = None, fps: float | None = None, flip: int = 0,
                    codec: str = "h264") -> str:
    """The GStreamer source pipeline for one input, ending in an appsink that yields BGR frames
    (the order OpenCV's GStreamer backend reads; OpenCVSource hands them on as RGB).

    kind: "csi" (location = sensor id), "v4l2" (a /dev/videoN path), "rtsp" (a URL),
    "file" (a video path). `jetson` picks the hardware decoder and converter.
    """
    if kind == "csi":
        if not jetson:
            raise ValueError("CSI cameras (nvarguscamerasrc) exist only on Jetson")
        cam = _raw_caps(width or 1920, height or 1080, fps or 30, memory="NVMM") + ",format=NV12"
        return (f"nvarguscamerasrc sensor-id={int(location)} ! {cam} ! nvvidconv flip-method={int(flip)} ! "
                f"video/x-raw,format=BGRx ! {_TO_BGR} ! {_appsink(True)}")
    if kind == "v4l2":
        caps = _raw_caps(width, height, fps)
        # A USB camera gives raw frames; on Jetson nvvidconv does the colour conversion in hardware.
        convert = "nvvidconv ! video/x-raw,format=BGRx ! " + _TO_BGR if jetson else _TO_BGR
        return f"v4l2src device={_quote(location)} ! {caps} ! {convert} ! {_appsink(True)}"
    if kind == "rtsp":
        if codec not in _DEPAY:
            raise ValueError(f"unsupported stream codec {codec!r}: use one of {sorted(_DEPAY)}")
        src = f"rtspsrc location={_quote(location)} latency=200 ! {_DEPAY[codec]}"
        decode = f"nvv4l2decoder ! {_NVMM_TO_BGR}" if jetson else f"avdec_{codec} ! {_TO_BGR}"
        return f"{src} ! {decode} ! {_appsink(True)}"
    if kind == "file":
        src = f"filesrc location={_quote(location)}"
        # parsebin finds the demuxer and parser for any container; nvv4l2decoder takes the stream.
        decode = f"parsebin ! nvv4l2decoder ! {_NVMM_TO_BGR}" if jetson else f"decodebin ! {_TO_BGR}"
        return f"{src} ! {decode} ! {_appsink(False)}"
    raise ValueError(f"no GStreamer source for kind {kind!r}")


def sink_pipeline(url: str, *, jetson: bool, bitrate_kbps: int = 4000) -> str:
    """The GStreamer pipeline that takes BGR frames from OpenCV's appsrc and streams them as H.264.

    url: "udp://HOST:PORT" (RTP over UDP, e.g. to a VLC or gst-launch viewer) or
    "rtsp://SERVER:PORT/PATH" (published to an RTSP server such as mediamtx).
    """
    parsed = urlparse(url)
    if jetson:
        encode = (f"videoconvert ! video/x-raw,format=BGRx ! nvvidconv ! video/x-raw(memory:NVMM),format=NV12 ! "
                  f"nvv4l2h264enc bitrate={bitrate_kbps * 1000} insert-sps-pps=true ! h264parse")
    else:
        encode = (f"videoconvert ! video/x-raw,format=I420 ! x264enc tune=zerolatency speed-preset=ultrafast "
                  f"bitrate={bitrate_kbps} key-int-max=30 ! h264parse")
    head = "appsrc is-live=true ! queue leaky=downstream max-size-buffers=2 ! "
    if parsed.scheme == "udp":
        if not parsed.hostname or not parsed.port:
            raise ValueError(f"a UDP output needs a host and port, like udp://192.168.1.10:5000 (got {url})")
        return f"{head}{encode} ! rtph264pay config-interval=1 pt=96 ! udpsink host={parsed.hostname} " \
               f"port={parsed.port} sync=false"
    if parsed.scheme in ("rtsp", "rtsps"):
        return f"{head}{encode} ! rtspclientsink location={_quote(url)}"
    raise ValueError(f"no GStreamer sink for {url!r}: use udp://HOST:PORT or rtsp://SERVER/PATH")
