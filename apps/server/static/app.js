// The chat page: talks only to this server's API (/v1/models, /v1/chat/completions), no external files.
"use strict";
const $ = (id) => document.getElementById(id);
let image = null;        // data URI of the image for the next question
let stream = null;       // the camera's MediaStream
let busy = false;
let liveTimer = null;
const history = [];      // the conversation, sent whole each time (the server reuses its cached prefix)

$("key").value = localStorage.getItem("edge-vlm-key") || "";
$("key").addEventListener("change", () => { localStorage.setItem("edge-vlm-key", $("key").value); loadModel(); });

function headers() {
  const h = { "Content-Type": "application/json" };
  if ($("key").value) h["Authorization"] = "Bearer " + $("key").value;
  return h;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    $("model").textContent = r.ok ? `${body.data[0].id} (context ${body.data[0].max_model_len})`
                                  : body.error.message;
  } catch (e) { $("model").textContent = "server unreachable"; }
}

function setImage(uri) {
  image = uri;
  $("thumb").hidden = !uri;
  if (uri) $("thumb").src = uri;
}

function readFile(file) {
  const reader = new FileReader();
  reader.onload = () => setImage(reader.result);
  reader.readAsDataURL(file);
}

$("file").addEventListener("change", (e) => { if (e.target.files[0]) readFile(e.target.files[0]); });
document.addEventListener("paste", (e) => {
  for (const item of e.clipboardData.items) if (item.type.startsWith("image/")) readFile(item.getAsFile());
});
$("clear").addEventListener("click", () => setImage(null));

$("camera").addEventListener("click", async () => {
  if (stream) { stream.getTracks().forEach((t) => t.stop()); stream = null; $("preview").hidden = true;
                $("snap").disabled = $("live").disabled = true; return; }
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: true });
    $("preview").srcObject = stream; $("preview").hidden = false;
    $("snap").disabled = $("live").disabled = false;
  } catch (e) { addMessage("error", "camera: " + e.message); }
});

function snapshot() {
  const v = $("preview"), c = document.createElement("canvas");
  c.width = v.videoWidth; c.height = v.videoHeight;
  c.getContext("2d").drawImage(v, 0, 0);
  return c.toDataURL("image/jpeg", 0.9);
}
$("snap").addEventListener("click", () => setImage(snapshot()));

$("live").addEventListener("change", () => {
  clearInterval(liveTimer);
  if ($("live").checked) {
    liveTimer = setInterval(() => { if (!busy && stream) ask($("question").value, snapshot(), true); },
                            Math.max(1, Number($("every").value)) * 1000);
  }
});

function addMessage(kind, text, img) {
  const div = document.createElement("div");
  div.className = "msg " + kind;
  if (img) { const i = document.createElement("img"); i.src = img; div.appendChild(i); }
  const span = document.createElement("span");
  span.textContent = text;
  div.appendChild(span);
  $("log").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return span;
}

async function ask(question, img, standalone) {
  if (busy || !question.trim()) return;
  busy = true; $("send").disabled = true;
  const content = img ? [{ type: "image_url", image_url: { url: img } }, { type: "text", text: question }] : question;
  const messages = standalone ? [{ role: "user", content }] : [...history, { role: "user", content }];
  addMessage("user", question, img);
  const out = addMessage("assistant", "");
  const t0 = performance.now();
  let first = null, pieces = 0, text = "";
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(),
      body: JSON.stringify({ messages, stream: true, stream_options: { include_usage: true } }) });
    if (!r.ok) throw new Error((await r.json()).error.message);
    const reader = r.body.getReader(), decoder = new TextDecoder();
    let buffer = "", usage = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).trim(); buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const event = JSON.parse(line.slice(6));
        if (event.error) throw new Error(event.error.message);
        if (event.usage) usage = event.usage;
        for (const c of event.choices || []) {
          if (c.delta && c.delta.content) {
            if (first === null) first = performance.now();
            text += c.delta.content; pieces++; out.textContent = text;
          }
        }
      }
    }
    const n = usage ? usage.completion_tokens : pieces;
    const secs = (performance.now() - (first || t0)) / 1000;
    $("stats").textContent = `time to first token ${Math.round((first || performance.now()) - t0)} ms · ` +
      `${n} tokens · ${(n > 1 && secs > 0 ? (n - 1) / secs : 0).toFixed(1)} tokens/s`;
    if (!standalone) history.push({ role: "user", content }, { role: "assistant", content: text });
  } catch (e) {
    out.parentElement.className = "msg error"; out.textContent = e.message;
  } finally { busy = false; $("send").disabled = false; }
}

$("ask").addEventListener("submit", (e) => {
  e.preventDefault();
  const q = $("question").value, img = image;
  setImage(null);
  ask(q, img, false);
});
$("question").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("ask").requestSubmit(); }
});
loadModel();
