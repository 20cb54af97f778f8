// The vramq web page: a thin client of the HTTP API (/openapi.json), no framework.
// Everything goes to this server only (the page's Content-Security-Policy enforces it).

const $ = (id) => document.getElementById(id);
const KEY = "vramq.api_key"; // the API key, kept in this browser after "Create free account" / "Use a key"
const KINDS = ["text", "image", "video", "speech"];
const OPTIONS = {
  text: ["max_tokens", "temperature"],
  image: ["width", "height", "steps"],
  video: ["width", "height", "steps", "num_frames"],
  speech: [],
};

const state = {
  models: new Map(), // id -> model
  job: null, // the job shown in Run / Result
  follow: null, // AbortController of the event stream being read
  shownModel: null, // the model whose fields the form shows
  audioFile: null, // {file, id}: the uploaded audio, reused while the same file is chosen
  historyCursor: null,
};

// --- the API ------------------------------------------------------------------------------

class Problem extends Error {
  constructor(status, body) {
    super(body.detail || body.title || `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

function authHeaders() {
  const key = localStorage.getItem(KEY);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function api(path, { method = "GET", json, form, headers = {} } = {}) {
  const init = { method, headers: { ...authHeaders(), ...headers } };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  } else if (form) {
    init.body = form; // multipart; the browser sets the boundary
  }
  const resp = await fetch(path, init);
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Problem(resp.status, body);
  return body;
}

function notify(message) {
  const notice = $("notice");
  notice.textContent = message;
  notice.hidden = !message;
}

const when = (iso) => (iso ? new Date(iso).toLocaleString() : "–");

// --- tokens -------------------------------------------------------------------------------

async function refreshUsage() {
  try {
    const u = await api("/v1/usage");
    $("tier").textContent = u.tier === "anonymous" ? "Anonymous" : `Account (${u.tier})`;
    $("used").textContent = u.used_today.toLocaleString();
    $("allowance").textContent = u.daily_allowance.toLocaleString();
    $("balance").textContent = u.balance.toLocaleString();
    $("resets").textContent = when(u.resets_at);
    $("resets").dateTime = u.resets_at;
  } catch (e) {
    if (e instanceof Problem && e.status === 401) signOut("That API key is not known here; signed out.");
  }
}

// --- accounts -----------------------------------------------------------------------------

function showAccount() {
  const keyed = Boolean(localStorage.getItem(KEY));
  $("create-account").hidden = keyed;
  $("use-key-toggle").hidden = keyed;
  $("sign-out").hidden = !keyed;
  $("history-toggle").hidden = !keyed;
  if (!keyed) $("history").hidden = true;
  refreshUsage();
}

function signOut(message = "") {
  localStorage.removeItem(KEY);
  state.audioFile = null; // uploads belong to the caller who made them
  showAccount();
  notify(message);
}

async function createAccount() {
  try {
    const acct = await api("/v1/accounts", { method: "POST", json: {} });
    localStorage.setItem(KEY, acct.api_key);
    $("new-key-value").textContent = acct.api_key;
    $("new-key").hidden = false;
    $("new-key-done").focus();
    state.audioFile = null;
    showAccount();
  } catch (e) {
    notify(`Could not create an account: ${e.message}`);
  }
}

async function useKey(event) {
  event.preventDefault();
  const key = $("key-input").value.trim();
  const resp = await fetch("/v1/account", { headers: { Authorization: `Bearer ${key}` } });
  if (!resp.ok) {
    notify("That API key was not accepted.");
    return;
  }
  localStorage.setItem(KEY, key);
  $("key-input").value = "";
  $("key-form").hidden = true;
  $("use-key-toggle").setAttribute("aria-expanded", "false");
  state.audioFile = null;
  notify("");
  showAccount();
}

// --- the form -----------------------------------------------------------------------------

async function loadModels() {
  const { data } = await api("/v1/models");
  const select = $("model");
  select.replaceChildren();
  for (const kind of KINDS) {
    const models = data.filter((m) => m.kind === kind);
    if (!models.length) continue;
    const group = document.createElement("optgroup");
    group.label = kind[0].toUpperCase() + kind.slice(1);
    for (const m of models) {
      state.models.set(m.id, m);
      const opt = new Option(m.available ? m.id : `${m.id} (offline)`, m.id);
      opt.disabled = !m.available;
      group.append(opt);
    }
    select.append(group);
  }
  const first = data.find((m) => m.available);
  if (first) select.value = first.id;
  modelChanged();
}

function currentModel() {
  return state.models.get($("model").value);
}

// Show the fields of the chosen model's kind, with its defaults and limits.
function modelChanged() {
  const m = currentModel();
  if (!m || m.id === state.shownModel) return estimateSoon(); // the same model again: keep what was typed
  state.shownModel = m.id;
  for (const el of document.querySelectorAll("[data-for]")) {
    el.hidden = !el.dataset.for.split(" ").includes(m.kind);
  }
  const d = m.defaults || {};
  const lim = m.limits || {};
  const bounds = {
    width: [lim.min_side, lim.max_width],
    height: [lim.min_side, lim.max_height],
    steps: [1, lim.max_steps],
    num_frames: [1, lim.max_frames],
    max_tokens: [1, lim.max_tokens],
  };
  for (const name of OPTIONS[m.kind]) {
    const input = $(name);
    if (d[name] !== undefined) input.value = d[name];
    const [min, max] = bounds[name] || [];
    if (min !== undefined) input.min = min;
    if (max !== undefined) input.max = max;
  }
  $("model-note").textContent = `${m.description || m.id} · ${m.queue_depth} queued`;
  estimateSoon();
}

async function audioId() {
  const file = $("audio").files[0];
  if (!file) throw new Error("Choose an audio file.");
  if (state.audioFile && state.audioFile.file === file) return state.audioFile.id;
  const form = new FormData();
  form.append("purpose", "audio");
  form.append("file", file);
  const uploaded = await api("/v1/files", { method: "POST", form });
  state.audioFile = { file, id: uploaded.id };
  return uploaded.id;
}

// The job's body from the form; the speech kind uploads its file first (once per file).
async function jobBody() {
  const m = currentModel();
  const input = {};
  if (m.kind === "speech") {
    input.audio = await audioId();
    input.task = $("task").value;
    if ($("language").value.trim()) input.language = $("language").value.trim();
  } else {
    input.prompt = $("prompt").value;
  }
  for (const name of OPTIONS[m.kind]) {
    if ($(name).value !== "") input[name] = Number($(name).value);
  }
  return { model: m.id, input };
}

let estimateTimer = null;
function estimateSoon() {
  clearTimeout(estimateTimer);
  estimateTimer = setTimeout(estimate, 300); // one request per pause in typing
}

async function estimate() {
  const out = $("estimate");
  const m = currentModel();
  if (!m || (m.kind === "speech" && !$("audio").files[0]) || (m.kind !== "speech" && !$("prompt").value.trim())) {
    out.value = "–";
    return;
  }
  try {
    const e = await api("/v1/estimate", { method: "POST", json: await jobBody() });
    out.value = e.enough
      ? `${e.tokens.toLocaleString()} tokens`
      : `${e.tokens.toLocaleString()} tokens (you have ${e.tokens_left.toLocaleString()} left)`;
  } catch (e) {
    out.value = e.message;
  }
}

async function submit(event) {
  event.preventDefault();
  notify("");
  const button = $("generate-button");
  button.disabled = true;
  try {
    const body = await jobBody();
    if (body.input.prompt !== undefined && !body.input.prompt.trim()) throw new Error("Type a prompt.");
    const job = await api("/v1/jobs", {
      method: "POST",
      json: body,
      headers: { "Idempotency-Key": crypto.randomUUID() }, // a retried click never makes two jobs
    });
    showJob(job);
    follow(job);
  } catch (e) {
    if (e instanceof Problem && e.status === 402) {
      const b = e.body;
      notify(
        `Not enough tokens: this job needs ${b.tokens_needed.toLocaleString()}, you have ` +
          `${b.tokens_available.toLocaleString()} (${b.shortfall.toLocaleString()} missing). ` +
          `Your allowance resets ${when(b.resets_at)}.`,
      );
    } else {
      notify(e.message);
    }
  } finally {
    button.disabled = false;
    refreshUsage();
  }
}

// --- run ----------------------------------------------------------------------------------

function setProgress(fraction) {
  const pct = Math.round(fraction * 100);
  const bar = $("progress");
  bar.setAttribute("aria-valuenow", String(pct));
  bar.firstElementChild.style.width = `${pct}%`;
}

function showStatus(job) {
  $("status").textContent = job.status[0].toUpperCase() + job.status.slice(1);
  $("status").dataset.status = job.status;
  const queued = job.status === "queued" && job.queue_position !== null && job.queue_position !== undefined;
  $("queue").textContent = queued
    ? `Position ${job.queue_position + 1} in the queue` +
      (job.eta_seconds ? `, about ${Math.ceil(job.eta_seconds)} s` : "")
    : "";
  $("cancel").hidden = !["queued", "running"].includes(job.status);
}

function showJob(job) {
  if (state.follow) state.follow.abort();
  state.job = job;
  $("run").hidden = false;
  $("run").dataset.job = job.id; // which job the page follows (read by the browser tests too)
  $("result").hidden = true;
  $("text-output").textContent = "";
  $("text-output").dataset.deltas = "0";
  $("share-box").hidden = true;
  $("unshare").hidden = true;
  $("share").hidden = false;
  setProgress(job.progress || 0);
  showStatus(job);
  $("run").scrollIntoView({ block: "nearest" });
}

// Parse one server-sent event block ("event: …\ndata: …\nid: …").
function parseEvent(block) {
  const ev = { event: "message", data: "", id: null };
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue; // a keep-alive comment
    const [field, ...rest] = line.split(":");
    const value = rest.join(":").replace(/^ /, "");
    if (field === "event") ev.event = value;
    else if (field === "data") ev.data += value;
    else if (field === "id") ev.id = value;
  }
  return ev.data ? { ...ev, data: JSON.parse(ev.data) } : null;
}

// Follow the job's events. EventSource cannot send the Authorization header that a keyed
// caller's jobs need, so the stream is read with fetch() and parsed here; the server
// closes a stream after VRAMQ_STREAM_SECONDS, and it is picked up again with
// Last-Event-ID. While queued, the job itself is polled for its place in the queue
// (events carry the status, not the position).
async function follow(job) {
  const ctl = new AbortController();
  state.follow = ctl;
  const text = $("text-output");
  let last = null;
  const poll = setInterval(async () => {
    if (state.job?.status !== "queued") return;
    try {
      const fresh = await api(`/v1/jobs/${job.id}`);
      if (state.job?.id === fresh.id && fresh.status === "queued") showStatus(fresh);
    } catch {
      /* the stream reports what matters */
    }
  }, 1500);
  try {
    while (!ctl.signal.aborted) {
      const headers = { ...authHeaders(), ...(last ? { "Last-Event-ID": last } : {}) };
      const resp = await fetch(`/v1/jobs/${job.id}/events`, { headers, signal: ctl.signal });
      if (!resp.ok) throw new Problem(resp.status, await resp.json().catch(() => ({})));
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replace(/\r\n/g, "\n");
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const ev = parseEvent(buffer.slice(0, cut));
          buffer = buffer.slice(cut + 2);
          if (!ev) continue;
          if (ev.id) last = ev.id;
          if (ev.event === "status") {
            state.job = { ...state.job, status: ev.data.status };
            showStatus(state.job);
          } else if (ev.event === "progress") {
            setProgress(ev.data.progress);
          } else if (ev.event === "delta") {
            // Chat text as it is generated; shown before the job has finished.
            text.hidden = false;
            $("result").hidden = false;
            text.textContent += ev.data.text;
            text.dataset.deltas = String(Number(text.dataset.deltas) + 1);
          } else if (ev.event === "done") {
            finished(ev.data);
            return;
          }
        }
      }
    }
  } catch (e) {
    if (!ctl.signal.aborted) notify(`Lost the job's progress: ${e.message}`);
  } finally {
    clearInterval(poll);
  }
}

async function cancel() {
  try {
    const job = await api(`/v1/jobs/${state.job.id}/cancel`, { method: "POST" });
    state.job = job;
    showStatus(job);
  } catch (e) {
    notify(e.message);
  }
}

function finished(job) {
  state.job = job;
  showStatus(job);
  if (job.status === "succeeded") setProgress(1);
  refreshUsage();
  if (job.status !== "succeeded") {
    if (job.error) notify(`The job ${job.status}: ${job.error.message}`);
    return;
  }
  showResult(job, $("media"), { owner: true });
}

// --- result -------------------------------------------------------------------------------

function link(a, url) {
  a.href = url;
  a.hidden = !url;
}

// Show a job's output; `owner` false for a shared job (no save or share).
function showResult(job, media, { owner }) {
  $("result").hidden = false;
  media.replaceChildren();
  const out = job.output;
  const text = $("text-output");
  $("subtitles").hidden = true;
  $("save").hidden = $("share").hidden = !owner;
  $("unshare").hidden = true;
  if (job.outputs_expired || !out) {
    $("result-note").textContent = "This result has expired: its files were deleted after the retention period.";
    $("actions").hidden = true;
    return;
  }
  $("actions").hidden = false;
  $("result-note").textContent = job.expires_at ? `Kept until ${when(job.expires_at)} unless saved.` : "Saved.";
  let download = null;
  if (out.images) {
    for (const im of out.images) {
      const img = new Image(im.width, im.height);
      img.src = im.url;
      img.alt = `Image for: ${job.input.prompt}`;
      media.append(img);
    }
    download = out.images[0].url;
    text.hidden = true;
  } else if (out.video) {
    const video = document.createElement("video");
    video.src = out.video.url;
    video.controls = true;
    video.loop = true;
    video.setAttribute("aria-label", `Video for: ${job.input.prompt}`);
    media.append(video);
    download = out.video.url;
    text.hidden = true;
  } else {
    // chat reply or transcript: the final text replaces what was streamed (they match)
    text.hidden = false;
    if (text.dataset.deltas !== "0") text.dataset.streamMatches = String(text.textContent === out.text);
    text.textContent = out.text;
    if (out.files) {
      $("subtitles").hidden = false;
      link($("srt"), out.files.srt);
      link($("vtt"), out.files.vtt);
      download = out.files.srt;
    } else {
      download = URL.createObjectURL(new Blob([out.text], { type: "text/plain" }));
    }
  }
  link($("download"), download);
}

async function copy() {
  const out = state.job?.output || {};
  const value = out.text ?? out.images?.[0]?.url ?? out.video?.url ?? "";
  try {
    await navigator.clipboard.writeText(value.startsWith("/") ? location.origin + value : value);
    $("result-note").textContent = "Copied.";
  } catch {
    $("result-note").textContent = "Copying is not allowed here; select the text instead.";
  }
}

async function save() {
  if (!localStorage.getItem(KEY)) {
    $("result-note").textContent = "Saving needs a free account (Create free account, above).";
    return;
  }
  try {
    state.job = await api(`/v1/jobs/${state.job.id}/save`, { method: "POST" });
    $("result-note").textContent = "Saved: kept past the retention period.";
  } catch (e) {
    $("result-note").textContent = e.message;
  }
}

async function share() {
  try {
    const { url } = await api(`/v1/jobs/${state.job.id}/share`, { method: "POST" });
    $("share-url").value = url;
    $("share-box").hidden = false;
    $("unshare").hidden = false;
    $("share").hidden = true;
    $("result-note").textContent = "Anyone with the link can see this result, without a key.";
  } catch (e) {
    $("result-note").textContent = e.message;
  }
}

async function unshare() {
  try {
    await api(`/v1/jobs/${state.job.id}/share`, { method: "DELETE" });
    $("share-box").hidden = true;
    $("unshare").hidden = true;
    $("share").hidden = false;
    $("result-note").textContent = "The link no longer works.";
  } catch (e) {
    $("result-note").textContent = e.message;
  }
}

// --- history ------------------------------------------------------------------------------

async function loadHistory(more = false) {
  const params = new URLSearchParams({ limit: "10" });
  if ($("history-kind").value) params.set("kind", $("history-kind").value);
  if ($("history-status").value) params.set("status", $("history-status").value);
  if (more && state.historyCursor) params.set("cursor", state.historyCursor);
  const list = $("history-list");
  if (!more) list.replaceChildren();
  try {
    const page = await api(`/v1/jobs?${params}`);
    for (const job of page.data) {
      const item = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "link";
      const what = job.input.prompt ?? "audio";
      button.textContent = `${when(job.created_at)} · ${job.model} · ${job.status} · ${String(what).slice(0, 60)}`;
      button.addEventListener("click", () => reopen(job.id));
      item.append(button);
      list.append(item);
    }
    if (!list.children.length) list.innerHTML = "<li>No jobs yet.</li>";
    state.historyCursor = page.next_cursor;
    $("history-more").hidden = !page.next_cursor;
  } catch (e) {
    notify(e.message);
  }
}

async function reopen(id) {
  const job = await api(`/v1/jobs/${id}`); // fresh signed links
  showJob(job);
  if (["queued", "running"].includes(job.status)) follow(job);
  else finished(job);
}

// --- bulk ---------------------------------------------------------------------------------

async function bulk(event) {
  event.preventDefault();
  const status = $("bulk-status");
  $("bulk-manifest").hidden = true;
  try {
    let body;
    const file = $("bulk-file").files[0];
    if (file) {
      const form = new FormData();
      form.append("purpose", "batch");
      form.append("file", file);
      body = { input_file: (await api("/v1/files", { method: "POST", form })).id };
    } else {
      const prompts = $("bulk-prompts").value.split("\n").map((p) => p.trim()).filter(Boolean);
      if (!prompts.length) throw new Error("Type prompts, one a line, or choose a JSONL file.");
      const model = currentModel().id;
      body = { jobs: prompts.map((prompt, i) => ({ custom_id: `line-${i + 1}`, model, input: { prompt } })) };
    }
    let batch = await api("/v1/batches", { method: "POST", json: body });
    // Counts are polled: a batch takes minutes, a request a second is plenty.
    while (!["completed", "canceled"].includes(batch.status)) {
      status.textContent = counts(batch);
      await new Promise((r) => setTimeout(r, 1000));
      batch = await api(`/v1/batches/${batch.id}`);
    }
    status.textContent = counts(batch);
    if (batch.results_url) {
      link($("bulk-manifest"), batch.results_url);
    }
  } catch (e) {
    status.textContent = e.message;
  } finally {
    refreshUsage();
  }
}

function counts(batch) {
  const c = batch.counts;
  return `Batch ${batch.status}: ${c.succeeded} succeeded, ${c.failed} failed, ${c.running} running, ${c.queued} queued of ${c.total}.`;
}

// --- a shared link (/s/<token>) -----------------------------------------------------------

async function openShared(token) {
  $("generate").hidden = true;
  $("bulk").hidden = true;
  $("shared").hidden = false;
  const resp = await fetch(`/s/${encodeURIComponent(token)}`, { headers: { Accept: "application/json" } });
  if (!resp.ok) {
    $("shared-missing").hidden = false;
    return;
  }
  const job = await resp.json();
  state.job = job;
  showResult(job, $("media"), { owner: false });
}

// --- start --------------------------------------------------------------------------------

function start() {
  $("create-account").addEventListener("click", createAccount);
  $("use-key-toggle").addEventListener("click", () => {
    const form = $("key-form");
    form.hidden = !form.hidden;
    $("use-key-toggle").setAttribute("aria-expanded", String(!form.hidden));
    if (!form.hidden) $("key-input").focus();
  });
  $("key-form").addEventListener("submit", useKey);
  $("new-key-done").addEventListener("click", () => {
    $("new-key").hidden = true;
    $("new-key-value").textContent = ""; // shown once
  });
  $("sign-out").addEventListener("click", () => signOut(""));
  $("history-toggle").addEventListener("click", () => {
    const section = $("history");
    section.hidden = !section.hidden;
    $("history-toggle").setAttribute("aria-expanded", String(!section.hidden));
    if (!section.hidden) loadHistory();
  });
  $("history-kind").addEventListener("change", () => loadHistory());
  $("history-status").addEventListener("change", () => loadHistory());
  $("history-more").addEventListener("click", () => loadHistory(true));
  $("model").addEventListener("change", modelChanged);
  $("job-form").addEventListener("input", estimateSoon);
  $("job-form").addEventListener("submit", submit);
  $("cancel").addEventListener("click", cancel);
  $("copy").addEventListener("click", copy);
  $("save").addEventListener("click", save);
  $("share").addEventListener("click", share);
  $("unshare").addEventListener("click", unshare);
  $("bulk-form").addEventListener("submit", bulk);

  const shared = location.pathname.match(/^\/s\/([^/]+)$/);
  showAccount();
  if (shared) openShared(decodeURIComponent(shared[1]));
  else loadModels().catch((e) => notify(`Could not load the models: ${e.message}`));
  setInterval(refreshUsage, 30000);
  document.body.dataset.ready = "true"; // the handlers are in place
}

start();
