// The secureinfer web chat: streams /v1/chat/completions (server-sent events), shows what each response cost per
// domain (the "secureinfer" field of the last chunk) and what protects the model (/v1/secureinfer/status).
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];  // {role, content} of the finished turns
let controller = null;

function setState(s) {
  document.body.dataset.state = s;
  $("send").disabled = s === "busy";
  $("stop").disabled = s !== "busy";
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function fill(dl, rows) {
  dl.replaceChildren();
  for (const [k, v] of rows) {
    dl.append(el("dt", "", k));
    const dd = el("dd");
    if (v instanceof Node) dd.append(v); else dd.textContent = v;
    dl.append(dd);
  }
}

function showError(msg) {
  const e = $("error");
  e.textContent = msg;
  e.hidden = !msg;
}

function fmtSeconds(s) {
  if (s === null || s === undefined) return "–";
  return s >= 1 ? s.toFixed(2) + " s" : (s * 1000).toFixed(1) + " ms";
}
function fmtBytes(b) {
  if (b >= 1 << 20) return (b / (1 << 20)).toFixed(2) + " MiB";
  if (b >= 1024) return (b / 1024).toFixed(1) + " KiB";
  return Math.round(b) + " B";
}

// ---- protection status ----

async function loadStatus() {
  try {
    const r = await fetch("v1/secureinfer/status");
    const s = await r.json();
    if (!r.ok) throw new Error(s.error ? s.error.message : r.statusText);
    $("model-name").textContent = `${s.model} · ${s.mode} · context ${s.n_ctx}`;
    const enc = s.enclave || {};
    const badge = $("protection-badge");
    const isolated = enc.host === "worker";
    badge.textContent = isolated ? "secrets isolated in the enclave" : enc.host === "none" ? "no enclave" : "not isolated (test host)";
    badge.className = "badge " + (isolated ? "ok" : "warn");
    const policy = s.package ? `top-${s.package.release.logprobs_top_k} log-probs${s.package.release.nll ? ", likelihoods" : ""}` +
      ` · temperature ≤ ${s.package.sampling.max_temperature}` +
      (s.package.sampling.min_top_k ? ` · top-k ≥ ${s.package.sampling.min_top_k}` : "") +
      (s.package.sampling.min_top_p ? ` · top-p ≥ ${s.package.sampling.min_top_p}` : "") : "no package (no owner policy)";
    const meas = el("code", "", enc.measurement || "–");
    fill($("protection"), [
      ["enclave host", enc.host || "–"],
      ["isolation", enc.isolation || "–"],
      ["measurement", meas],
      ["configuration", enc.measurement_config || "–"],
      ["package", s.package ? `${s.package.name} (${s.package.model_id})` : "none"],
      ["owner policy", policy],
      ["secret tensors", (s.secret_tensors && s.secret_tensors.length ? s.secret_tensors.join(", ") : "none") +
        (s.adapter ? " + LoRA adapter" : "")],
      ["leaves enclave", s.released.summary],
      ...(s.warnings || []).map((w) => ["warning", w]),
    ]);
    if (s.max_tokens && +$("max_tokens").value > s.max_tokens) $("max_tokens").value = s.max_tokens;
  } catch (e) {
    fill($("protection"), [["status", "unavailable: " + e.message]]);
  }
}

// ---- the per-response panel ----

function renderPanel(target, cost, clientSeconds) {
  const t = cost.enclave_seconds + cost.accelerator_seconds + cost.host_seconds;
  const n = Math.max(1, cost.generated_tokens);
  const bytes = cost.bytes_to_enclave + cost.bytes_from_enclave;
  const rate = cost.decode_tokens_per_second ?? (cost.seconds > 0 ? cost.generated_tokens / cost.seconds : 0);
  target.replaceChildren();
  target.dataset.enclaveSeconds = cost.enclave_seconds;
  target.dataset.acceleratorSeconds = cost.accelerator_seconds;
  target.dataset.hostSeconds = cost.host_seconds;
  target.dataset.crossings = cost.crossings;
  target.dataset.tokens = cost.generated_tokens;
  const item = (label, value, cls) => {
    const s = el("span", cls || "");
    if (cls) { const k = el("i", "key " + cls); k.style.background = `var(--${cls === "accelerator" ? "acc" : cls === "enclave" ? "enc" : "host"})`; s.append(k); }
    s.append(label + " ", el("b", "", value));
    return s;
  };
  target.append(
    item("tokens", `${cost.prompt_tokens} in · ${cost.generated_tokens} out`),
    item("speed", `${rate.toFixed(1)} tok/s`),
    item("first token", fmtSeconds(cost.ttft_seconds)),
    item("enclave", fmtSeconds(cost.enclave_seconds), "enclave"),
    item("accelerator", fmtSeconds(cost.accelerator_seconds), "accelerator"),
    item("host", fmtSeconds(cost.host_seconds), "host"),
    item("crossings", `${cost.crossings} (${(cost.crossings / n).toFixed(1)}/token)`),
    item("enclave I/O", `${fmtBytes(bytes / n)}/token`),
  );
  const bar = el("div", "bar");
  for (const [cls, v] of [["enclave", cost.enclave_seconds], ["accelerator", cost.accelerator_seconds], ["host", cost.host_seconds]]) {
    const s = el("span", cls);
    s.style.width = (t > 0 ? (100 * v) / t : 0) + "%";
    s.title = `${cls}: ${fmtSeconds(v)}`;
    bar.append(s);
  }
  target.append(bar);
  fill($("last-panel"), [
    ["mode", cost.mode],
    ["tokens/s", rate.toFixed(1)],
    ["first token", fmtSeconds(cost.ttft_seconds)],
    ["total", fmtSeconds(cost.seconds) + ` (browser ${fmtSeconds(clientSeconds)})`],
    ["enclave", fmtSeconds(cost.enclave_seconds)],
    ["accelerator", fmtSeconds(cost.accelerator_seconds)],
    ["host", fmtSeconds(cost.host_seconds)],
    ["crossings", `${cost.crossings} (${cost.enclave_calls} enclave calls)`],
    ["to enclave", `${fmtBytes(cost.bytes_to_enclave / n)}/token`],
    ["from enclave", `${fmtBytes(cost.bytes_from_enclave / n)}/token`],
    ["to accelerator", `${fmtBytes(cost.bytes_to_accelerator / n)}/token`],
  ]);
}

// ---- chat ----

function addMessage(role, text) {
  const m = el("div", "msg " + role);
  m.append(el("div", "role", role), el("div", "content", text));
  $("messages").append(m);
  m.scrollIntoView({ block: "end" });
  return m;
}

function num(id) {
  const v = $(id).value.trim();
  return v === "" ? undefined : Number(v);
}

function errorText(j, status) {
  if (j && j.error && j.error.message) return j.error.message;
  return `the server answered HTTP ${status}`;
}

async function send(text) {
  showError("");
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history, { role: "user", content: text });
  const body = {
    messages, stream: true, stream_options: { include_usage: true },
    temperature: num("temperature"), top_k: num("top_k"), top_p: num("top_p"), max_tokens: num("max_tokens"),
    seed: num("seed"),
  };
  const userMsg = addMessage("user", text);
  const msg = addMessage("assistant", "");
  msg.classList.add("streaming");
  const content = msg.querySelector(".content");
  const panel = el("div", "panel");
  msg.append(panel);
  controller = new AbortController();
  setState("busy");
  const t0 = performance.now();
  let answer = "", cost = null, failed = null, finish = null;
  try {
    const r = await fetch("v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!r.ok) {
      let j = null;
      try { j = await r.json(); } catch (_) { /* not JSON */ }
      throw new Error(errorText(j, r.status));
    }
    const reader = r.body.getReader();
    const dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const ev = buf.slice(0, i);
        buf = buf.slice(i + 2);
        if (!ev.startsWith("data: ")) continue;
        const data = ev.slice(6);
        if (data === "[DONE]") continue;
        const j = JSON.parse(data);
        if (j.error) throw new Error(j.error.message);
        if (j.secureinfer) cost = j.secureinfer;
        const c = j.choices && j.choices[0];
        if (!c) continue;
        if (c.delta && c.delta.content) {
          answer += c.delta.content;
          content.textContent = answer;
        }
        if (c.finish_reason) finish = c.finish_reason;
      }
    }
  } catch (e) {
    failed = e.name === "AbortError" ? null : e.message;
    if (e.name === "AbortError") panel.append(el("span", "", "stopped"));
  }
  controller = null;
  msg.classList.remove("streaming");
  msg.dataset.finish = finish || (failed ? "error" : "stopped");
  if (failed) {
    // A refused turn leaves the conversation as it was; the text goes back into the box to be edited.
    msg.remove();
    userMsg.remove();
    if (!$("prompt").value) $("prompt").value = text;
    showError(failed);
    $("error").scrollIntoView({ block: "nearest" });
  } else {
    history.push({ role: "user", content: text }, { role: "assistant", content: answer });
    if (cost) renderPanel(panel, cost, (performance.now() - t0) / 1000);
  }
  setState("idle");
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value;
  if (!text.trim() || document.body.dataset.state === "busy") return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("clear").addEventListener("click", () => {
  if (controller) controller.abort();
  history.length = 0;
  $("messages").replaceChildren();
  showError("");
});

loadStatus().then(() => setState("idle"));
