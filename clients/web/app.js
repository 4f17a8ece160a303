// casa-live browser demo: plain JavaScript, no build step, served by the server at GET /.
//
// Flow: pick a source (camera via getUserMedia, or the server's synthetic demo clip in a <video>) ->
// open the websocket /v1/stream -> session.created -> send session.update {prompt, fps, mode: live}
// -> session.updated -> every 1/fps seconds draw the video into a canvas and send it as a JPEG image
// frame (binary kind 0x01: 1 byte kind, 8-byte big-endian pts in microseconds, the JPEG bytes).
// Captions stream back as caption.delta (shown live over the video) and caption.segment (final).
// Latency shown here is measured by the page: frame sent -> its caption.segment received.
//
// Questions: the box under the video sends response.create {id, question} about what the stream shows
// now; the server answers on a side branch of the session (the captions never see it) about the
// latest captioned frame: response.created (the frame it sees) -> response.output_text.delta* ->
// response.done. Each answer is an element of its own in the Answers list beside the captions, marked
// as an answer, its text streaming in, then the frame it saw and its status. Questions in flight when
// a session ends get no answer (closing a session discards them): the page says so.
//
// Watches ("alert me when"): watches.js keeps the list, the alert banner and the alerts in the caption
// log; this file hands it the session's events and sends the list it asks for (in a session.update of
// its own right after each session's first session.updated, so a list the model refuses never stops
// the captions).
//
// Reconnect: a close with 1006 (dropped), 1011 (server error), 1012 (the server drained the session:
// session.draining came first) or 1013 (capacity) opens a new session after a jittered exponential
// backoff, at most MAX_TRIES in a row, shown in the status pill. The video, its clock (pts) and the
// settings in the form carry over; caption frame numbers go on from the last one shown.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KIND_IMAGE = 0x01;
  const MAX_SIDE = 640; // frames are downscaled to this longer side before JPEG encoding
  const JPEG_QUALITY = 0.85;
  const MAX_BUFFERED = 2 << 20; // skip a frame while the socket still holds this many unsent bytes
  const SPARK_POINTS = 60;
  const HISTORY_MAX = 200;
  const ANSWERS_MAX = 100;
  const VIDEO_TIMES_MAX = 400; // the video time of the frames sent recently, by pts
  const RETRY_CODES = new Set([1006, 1011, 1012, 1013]);
  const MAX_TRIES = 6;
  const BACKOFF_BASE_MS = 250;
  const BACKOFF_MAX_MS = 8000;

  const ERROR_WORDS = {
    unauthorized: "This server needs an access token. Enter it in the Token field and press Start again.",
    capacity: "The server is busy: every session slot is taken. Try again in a moment.",
    invalid_settings: "The server did not accept a setting.",
    bad_frame: "The server could not read a video frame.",
    frame_too_large: "A video frame was too large for the server. Try a smaller camera resolution.",
    unsupported_codec: "The server cannot decode this video format.",
    rate_limited: "Frames were sent faster than the server allows. Lower the frames per second.",
    session_timeout: "The session reached the server's time limit. Press Start to begin a new one.",
    internal: "The server hit an internal error; its log has the details.",
    invalid_request: "The server did not take the question.",
    bad_json: "The page and the server disagree about the protocol.",
    unknown_type: "The page and the server disagree about the protocol.",
  };
  const CLOSE_WORDS = {
    1008: ERROR_WORDS.unauthorized,
    1009: ERROR_WORDS.frame_too_large,
    1011: ERROR_WORDS.internal,
    1013: ERROR_WORDS.capacity,
  };

  const el = {
    video: $("video"), caption: $("caption"), placeholder: $("placeholder"), history: $("history"),
    model: $("model"), status: $("status"), error: $("error"), form: $("controls"),
    source: $("source"), prompt: $("prompt"), fps: $("fps"), token: $("token"),
    start: $("start"), stop: $("stop"), grab: $("grab"), spark: $("spark"),
    askForm: $("ask-form"), question: $("question"), ask: $("ask"), answers: $("answers"),
  };
  let askSeq = 0; // response ids a1, a2, ... for the page's lifetime
  const watchBox = window.casaWatches;

  // Everything about the current run; replaced on each Start.
  let run = null;

  function newRun() {
    return {
      ws: null, media: null, timer: null, opened: false, stopping: false, capturing: false,
      t0: performance.now(), fps: 2, sessionId: null,
      sent: 0, captioned: 0, dropped: 0, skipped: 0, lag: null, kv: null,
      inflight: [], // [{pts (us), t (ms)}] frames sent and not yet captioned
      latencies: [], ttfts: [], frame: null, partial: "", segments: [],
      tries: 0, reconnects: 0, retryTimer: null, draining: false,
      offset: 0, nextFrame: 0, // session frame index + offset = the run's frame number (goes on across sessions)
      statuses: [],
      questions: new Map(), // response id -> {id, question, li, text, frame, pts, status, ...} in flight
      answers: [], // the questions done (answered, refused or lost), in the order they ended
      videoTimes: new Map(), // pts (us) of a frame sent -> the video's currentTime when it was drawn
    };
  }

  // ---- status, errors ------------------------------------------------------------------------
  function setStatus(text, kind) {
    if (run) run.statuses.push(text);
    el.status.textContent = text;
    el.status.className = `pill ${kind || "idle"}`;
  }

  function showError(text) {
    el.error.textContent = text;
    el.error.hidden = false;
  }

  function clearError() {
    el.error.hidden = true;
    el.error.textContent = "";
  }

  function serverErrorWords(event) {
    const base = ERROR_WORDS[event.code] || "The server reported a problem.";
    return event.message ? `${base} (${event.message})` : base;
  }

  function mediaErrorWords(err) {
    switch (err && err.name) {
      case "NotAllowedError": return "Camera permission was denied. Allow the camera for this page, or pick the demo clip.";
      case "NotFoundError": case "OverconstrainedError": return "No camera was found. Connect one, or pick the demo clip.";
      case "NotReadableError": return "The camera is busy in another application. Close it there, or pick the demo clip.";
      case "SecurityError": return "The browser allows cameras only on https:// pages or on localhost.";
      default: return `The video source could not start: ${err && err.message ? err.message : err}`;
    }
  }

  // ---- sources -------------------------------------------------------------------------------
  async function openSource(r) {
    const video = el.video;
    if (el.source.value === "camera") {
      if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
        throw new Error("This browser offers no camera here: cameras work only on https:// pages or on localhost.");
      }
      try {
        r.media = await navigator.mediaDevices.getUserMedia({ video: { width: { ideal: 640 }, height: { ideal: 480 } }, audio: false });
      } catch (err) {
        throw new Error(mediaErrorWords(err));
      }
      video.removeAttribute("src");
      video.srcObject = r.media;
      video.loop = false;
    } else {
      video.srcObject = null;
      video.src = new URL("v1/demo-clip.webm", location.href).href;
      video.loop = true;
    }
    video.muted = true;
    try {
      await video.play();
    } catch (err) {
      if (el.source.value === "demo") {
        throw new Error("The server did not provide the demo clip (GET /v1/demo-clip.webm failed).");
      }
      throw new Error(mediaErrorWords(err));
    }
    el.placeholder.hidden = true;
  }

  function closeSource(r) {
    if (r.media) r.media.getTracks().forEach((t) => t.stop());
    r.media = null;
    el.video.pause();
  }

  // ---- websocket -----------------------------------------------------------------------------
  function streamUrl() {
    const url = new URL("v1/stream", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    const token = el.token.value.trim();
    if (token) url.searchParams.set("token", token); // browsers cannot set an Authorization header
    return url.href;
  }

  function sessionSettings() {
    const settings = { fps: Number(el.fps.value), mode: "live" };
    const prompt = el.prompt.value.trim();
    if (prompt) settings.prompt = prompt;
    return settings;
  }

  function send(r, obj) {
    if (r.ws && r.ws.readyState === WebSocket.OPEN) r.ws.send(JSON.stringify(obj));
  }

  function connect(r) {
    const ws = new WebSocket(streamUrl());
    ws.binaryType = "arraybuffer";
    r.ws = ws;
    ws.onopen = () => { r.opened = true; };
    r.draining = false;
    ws.onmessage = (msg) => {
      if (typeof msg.data !== "string") return;
      let event;
      try { event = JSON.parse(msg.data); } catch { return; }
      onEvent(r, event);
    };
    ws.onclose = (ev) => onClose(r, ev);
  }

  function onEvent(r, event) {
    switch (event.type) {
      case "session.created":
        r.sessionId = event.session_id;
        el.model.textContent = `model ${event.model} · session ${event.session_id}`;
        send(r, { type: "session.update", session: sessionSettings() });
        break;
      case "session.updated":
        r.fps = event.settings && event.settings.fps ? event.settings.fps : Number(el.fps.value);
        watchBox.onUpdated(event);
        if (!r.live) { // a new session (the first, or after a reconnect): its frame 0 is our next frame
          r.live = true;
          r.offset = r.nextFrame;
          if (r.reconnects) clearError();
          watchBox.sessionStarted();
        }
        startCapture(r);
        setAsk(true);
        setStatus(`live · ${r.fps} fps${r.reconnects ? ` · reconnected ${r.reconnects}×` : ""}`, "live");
        break;
      case "session.draining":
        r.draining = true;
        stopCapture(r);
        setAsk(false); // the server captions what it has, then closes with 1012: we reconnect
        setStatus("server draining · reconnecting", "connecting");
        break;
      case "caption.delta":
        if (r.offset + event.frame !== r.frame) { r.frame = r.offset + event.frame; r.partial = ""; }
        r.partial += event.text;
        showCaption(event.pts, r.partial, true);
        break;
      case "caption.segment":
        onSegment(r, event);
        break;
      case "stats":
        r.dropped = event.frames_dropped;
        r.lag = event.lag_ms;
        r.kv = event.kv_tokens;
        renderStats(r);
        break;
      case "response.created":
        onAnswerStarted(r, event.response);
        break;
      case "response.output_text.delta":
        onAnswerDelta(r, event);
        break;
      case "response.done":
        onAnswerDone(r, event.response);
        break;
      case "alert.started":
      case "alert.ended":
        watchBox.onAlert(event, r.offset + event.frame);
        break;
      case "error":
        if (watchBox.onError(event, serverErrorWords(event))) break; // the watch list was refused
        if (event.event_id && r.questions.has(event.event_id)) { // a question the server did not take
          onAnswerRefused(r, event.event_id, serverErrorWords(event));
          break;
        }
        // capacity and internal errors end in 1013 / 1011: the reconnect says what happens next
        if (!(event.fatal && (event.code === "capacity" || event.code === "internal"))) showError(serverErrorWords(event));
        else r.lastError = serverErrorWords(event);
        break;
      case "session.closed":
        watchBox.endSession();
        setStatus(`closed (${event.reason})`, "idle");
        break;
      default:
        break; // marker, and event types added by newer servers
    }
  }

  function backoffMs(attempt) {
    const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_BASE_MS * 2 ** (attempt - 1));
    return ceiling * (0.5 + 0.5 * Math.random()); // jittered: clients cut at once do not come back at once
  }

  function onClose(r, ev) {
    stopCapture(r);
    r.live = false;
    if (r === run) watchBox.endSession();
    for (const id of [...r.questions.keys()]) onAnswerRefused(r, id, "No answer: the session ended first.");
    if (r === run) setAsk(false);
    if (r !== run) { // an earlier run closing late: leave the current one's video and buttons alone
      if (r.media) r.media.getTracks().forEach((t) => t.stop());
      return;
    }
    const retry = !r.stopping && RETRY_CODES.has(ev.code) && (r.opened || r.reconnects > 0 || ev.code === 1013);
    if (retry && r.tries < MAX_TRIES) {
      r.tries += 1;
      r.reconnects += 1;
      const delay = backoffMs(r.tries);
      setStatus(`reconnecting in ${(delay / 1000).toFixed(1)} s (try ${r.tries} of ${MAX_TRIES})`, "connecting");
      r.retryTimer = setTimeout(() => { r.retryTimer = null; if (run === r && !r.stopping) connect(r); }, delay);
      return;
    }
    closeSource(r);
    setButtons(false);
    if (r.stopping || ev.code === 1000) {
      if (!el.status.textContent.startsWith("closed")) setStatus("stopped", "idle");
      return;
    }
    setStatus("disconnected", "failed");
    if (CLOSE_WORDS[ev.code]) {
      if (el.error.hidden) showError(CLOSE_WORDS[ev.code]);
    } else if (retry) {
      showError(`The connection to the server was lost and ${MAX_TRIES} reconnect tries failed${r.lastError ? ` (${r.lastError})` : ""}. Press Start to reconnect.`);
    } else if (!r.opened) {
      showError(`Could not connect to the server at ${location.host}. Is it running? If it needs a token, enter it in the Token field.`);
    } else if (el.error.hidden) {
      showError(`The connection to the server was lost${ev.reason ? ` (${ev.reason})` : ""}. Press Start to reconnect.`);
    }
  }

  // ---- capture -------------------------------------------------------------------------------
  function startCapture(r) {
    stopCapture(r);
    if (r.sent === 0) r.t0 = performance.now(); // pts count from the first frame sent
    r.timer = setInterval(() => captureFrame(r), 1000 / r.fps);
    captureFrame(r);
  }

  function stopCapture(r) {
    if (r.timer !== null) clearInterval(r.timer);
    r.timer = null;
  }

  function captureFrame(r) {
    const video = el.video;
    const ws = r.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN || video.readyState < 2 || !video.videoWidth) return;
    if (r.capturing || ws.bufferedAmount > MAX_BUFFERED) { r.skipped += 1; return; }
    const scale = Math.min(1, MAX_SIDE / Math.max(video.videoWidth, video.videoHeight));
    const w = Math.max(2, Math.round(video.videoWidth * scale));
    const h = Math.max(2, Math.round(video.videoHeight * scale));
    const canvas = el.grab;
    if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
    canvas.getContext("2d").drawImage(video, 0, 0, w, h);
    const videoTime = video.currentTime; // which picture of the clip this frame is
    const ptsUs = Math.round((performance.now() - r.t0) * 1000);
    r.capturing = true;
    canvas.toBlob(async (blob) => {
      r.capturing = false;
      if (!blob || r.ws !== ws || ws.readyState !== WebSocket.OPEN) return;
      const jpeg = new Uint8Array(await blob.arrayBuffer());
      const msg = new Uint8Array(9 + jpeg.byteLength);
      msg[0] = KIND_IMAGE;
      new DataView(msg.buffer).setBigInt64(1, BigInt(ptsUs), false);
      msg.set(jpeg, 9);
      ws.send(msg.buffer);
      r.videoTimes.set(ptsUs, videoTime);
      if (r.videoTimes.size > VIDEO_TIMES_MAX) r.videoTimes.delete(r.videoTimes.keys().next().value);
      r.sent += 1;
      r.inflight.push({ pts: ptsUs, t: performance.now() });
      if (r.inflight.length > 100) r.inflight.shift(); // frames the server dropped never come back
      renderStats(r);
    }, "image/jpeg", JPEG_QUALITY);
  }

  // ---- captions and stats --------------------------------------------------------------------
  function stamp(seconds) {
    const m = Math.floor(seconds / 60);
    const s = (seconds - m * 60).toFixed(1).padStart(4, "0");
    return `${String(m).padStart(2, "0")}:${s}`;
  }

  function showCaption(pts, text, partial) {
    el.caption.hidden = false;
    el.caption.className = partial ? "caption partial" : "caption";
    el.caption.replaceChildren();
    const ts = document.createElement("span");
    ts.className = "ts";
    ts.textContent = stamp(pts);
    el.caption.append(ts, document.createTextNode(text.trim() || "…"));
  }

  function onSegment(r, seg) {
    const now = performance.now();
    const key = Math.round(seg.start * 1e6);
    const i = r.inflight.findIndex((f) => Math.abs(f.pts - key) < 2000);
    let latency = seg.latency_ms;
    if (i >= 0) {
      latency = now - r.inflight[i].t;
      r.inflight.splice(0, i + 1); // older frames than this one were dropped by the server
    }
    r.captioned += 1;
    r.tries = 0; // this session works: a later loss gets a fresh set of tries
    const frame = r.offset + seg.frame;
    r.nextFrame = Math.max(r.nextFrame, frame + 1);
    r.frame = null;
    r.partial = "";
    r.latencies.push(latency);
    if (seg.ttft_ms !== undefined) r.ttfts.push(seg.ttft_ms);
    r.segments.push({
      frame, start: seg.start, end: seg.end, text: seg.text, reason: seg.reason, latency_ms: latency,
      watch_scores: seg.watch_scores || null,
    });
    watchBox.onScores(seg.watch_scores);
    showCaption(seg.start, seg.text, false);

    const li = document.createElement("li");
    const ts = document.createElement("span");
    ts.className = "ts";
    ts.textContent = stamp(seg.start);
    const ms = document.createElement("span");
    ms.className = "ms";
    ms.textContent = `${Math.round(latency)} ms`;
    const text = document.createElement("span");
    text.className = seg.text.trim() ? "text" : "text empty";
    text.textContent = seg.text.trim() || "(no words for this frame)";
    li.append(ts, text, ms);
    el.history.prepend(li);
    while (el.history.children.length > HISTORY_MAX) el.history.lastChild.remove();
    renderStats(r);
  }

  // ---- questions ---------------------------------------------------------------------------
  function setAsk(enabled) {
    el.question.disabled = !enabled;
    el.ask.disabled = !enabled;
  }

  function ask() {
    const r = run;
    const question = el.question.value.trim();
    if (!question) return;
    if (!r || !r.live || !r.ws || r.ws.readyState !== WebSocket.OPEN) {
      showError("Start a stream first: a question is about what the video shows now.");
      return;
    }
    const id = `a${++askSeq}`;
    const q = { id, question, text: "", frame: null, pts: null, status: "waiting", result: null, videoTime: null };
    q.li = answerElement(q);
    r.questions.set(id, q);
    el.answers.querySelectorAll(".hint").forEach((h) => h.remove());
    el.answers.prepend(q.li);
    while (el.answers.children.length > ANSWERS_MAX) el.answers.lastChild.remove();
    send(r, { type: "response.create", response: { id, question }, event_id: id });
    el.question.value = "";
  }

  function answerElement(q) {
    const li = document.createElement("li");
    li.className = "answer";
    li.dataset.id = q.id;
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = "answer";
    const question = document.createElement("span");
    question.className = "question";
    question.textContent = q.question;
    const text = document.createElement("span");
    text.className = "text";
    const meta = document.createElement("span");
    meta.className = "meta";
    li.append(badge, question, text, meta);
    renderAnswer(q, li);
    return li;
  }

  function renderAnswer(q, li = q.li) {
    li.dataset.status = q.status; // waiting -> answering -> done
    if (q.result) li.dataset.result = q.result; // completed | incomplete | cancelled | failed
    if (q.frame !== null) li.dataset.frame = String(q.frame);
    const text = li.querySelector(".text");
    const meta = li.querySelector(".meta");
    if (q.error) text.textContent = q.error;
    else if (q.status === "waiting") text.textContent = "…waiting for the next frame";
    else text.textContent = q.text.trim() || (q.status === "done" ? "(no words)" : "…");
    const parts = [];
    if (q.frame !== null) parts.push(`frame ${q.frame}${q.pts !== null ? ` · ${stamp(q.pts)}` : ""}`);
    if (q.status === "done" && q.result !== "completed") parts.push(q.result);
    if (q.latency !== undefined && q.latency !== null) parts.push(`${Math.round(q.latency)} ms`);
    meta.textContent = parts.join(" · ");
  }

  function onAnswerStarted(r, started) {
    const q = r.questions.get(started.id);
    if (!q) return;
    q.status = "answering";
    q.frame = r.offset + started.frame; // the run's numbering, as the captions
    renderAnswer(q);
  }

  function onAnswerDelta(r, event) {
    const q = r.questions.get(event.response_id);
    if (!q) return;
    q.status = "answering";
    q.text += event.delta;
    renderAnswer(q);
  }

  function onAnswerDone(r, done) {
    const q = r.questions.get(done.id);
    if (!q) return;
    r.questions.delete(done.id);
    q.status = "done";
    q.result = done.status;
    q.text = done.text;
    if (done.frame !== undefined && done.frame !== null) q.frame = r.offset + done.frame;
    if (done.pts !== undefined && done.pts !== null) {
      q.pts = done.pts;
      q.videoTime = videoTimeOf(r, done.pts);
    }
    q.latency = done.latency_ms;
    q.ttft = done.ttft_ms;
    if (done.status === "cancelled" && !done.text) q.error = "Cancelled: no answer.";
    renderAnswer(q);
    r.answers.push(q);
  }

  function onAnswerRefused(r, id, words) {
    const q = r.questions.get(id);
    if (!q) return;
    r.questions.delete(id);
    q.status = "done";
    q.result = "failed";
    q.error = words;
    renderAnswer(q);
    r.answers.push(q);
  }

  function videoTimeOf(r, pts) {
    const key = Math.round(pts * 1e6);
    if (r.videoTimes.has(key)) return r.videoTimes.get(key);
    for (const [us, t] of r.videoTimes) if (Math.abs(us - key) < 2000) return t;
    return null;
  }

  function percentile(values, q) {
    if (!values.length) return null;
    const sorted = [...values].sort((a, b) => a - b);
    return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
  }

  function fmtMs(v) { return v === null || v === undefined ? "–" : `${Math.round(v)} ms`; }

  function renderStats(r) {
    $("s-sent").textContent = r.skipped ? `${r.sent} (+${r.skipped} skipped)` : String(r.sent);
    $("s-captioned").textContent = String(r.captioned);
    $("s-dropped").textContent = String(r.dropped);
    $("s-lag").textContent = fmtMs(r.lag);
    $("s-latency").textContent = fmtMs(r.latencies.at(-1));
    const p50 = percentile(r.latencies, 0.5);
    $("s-pct").textContent = p50 === null ? "–" : `${Math.round(p50)} / ${Math.round(percentile(r.latencies, 0.95))} ms`;
    $("s-ttft").textContent = fmtMs(r.ttfts.at(-1));
    $("s-kv").textContent = r.kv === null ? "–" : String(r.kv);
    drawSparkline(r.latencies.slice(-SPARK_POINTS));
  }

  function drawSparkline(values) {
    const c = el.spark;
    const dpr = window.devicePixelRatio || 1;
    const w = c.clientWidth || c.width;
    const h = c.clientHeight || c.height;
    if (c.width !== Math.round(w * dpr)) { c.width = Math.round(w * dpr); c.height = Math.round(h * dpr); }
    const ctx = c.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    if (!values.length) return;
    const top = Math.max(20, ...values) * 1.15;
    const x = (i) => 4 + (i * (w - 8)) / Math.max(1, SPARK_POINTS - 1);
    const y = (v) => h - 4 - (v / top) * (h - 16);
    ctx.strokeStyle = "#5eb4ff";
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    values.forEach((v, i) => (i ? ctx.lineTo(x(i), y(v)) : ctx.moveTo(x(i), y(v))));
    ctx.stroke();
    ctx.fillStyle = "#8a91a3";
    ctx.font = "10px system-ui, sans-serif";
    ctx.fillText(`max ${Math.round(Math.max(...values))} ms`, 6, 11);
  }

  // ---- controls ------------------------------------------------------------------------------
  function setButtons(running) {
    el.start.disabled = running;
    el.stop.disabled = !running;
    el.source.disabled = running;
    el.token.disabled = running;
  }

  async function start() {
    if (run && run.ws && run.ws.readyState <= WebSocket.OPEN) return;
    clearError();
    const fps = Number(el.fps.value);
    if (!(fps > 0 && fps <= 10)) { showError("Frames per second must be between 0.25 and 10."); return; }
    const r = newRun();
    run = r;
    el.history.replaceChildren();
    el.answers.replaceChildren();
    watchBox.newRun();
    el.caption.hidden = true;
    renderStats(r);
    setButtons(true);
    setStatus("starting", "connecting");
    try {
      await openSource(r);
    } catch (err) {
      closeSource(r);
      setButtons(false);
      setStatus("failed", "failed");
      showError(err.message);
      return;
    }
    setStatus("connecting", "connecting");
    connect(r);
  }

  function stop() {
    const r = run;
    if (!r) return;
    r.stopping = true;
    stopCapture(r);
    if (r.retryTimer !== null) { clearTimeout(r.retryTimer); r.retryTimer = null; }
    if (r.ws && r.ws.readyState === WebSocket.OPEN) {
      send(r, { type: "session.close" }); // the server flushes, sends session.closed, closes with 1000
      const ws = r.ws;
      setTimeout(() => { if (ws.readyState !== WebSocket.CLOSED) ws.close(1000); }, 3000);
      setStatus("closing", "connecting");
    } else {
      if (r.ws) r.ws.close();
      closeSource(r);
      setButtons(false);
      setStatus("stopped", "idle");
    }
  }

  // Prompt and fps changes apply to a running session.
  function pushSettings() {
    if (run && run.ws && run.ws.readyState === WebSocket.OPEN && !run.stopping) {
      send(run, { type: "session.update", session: sessionSettings() });
    }
  }

  el.form.addEventListener("submit", (e) => { e.preventDefault(); start(); });
  el.stop.addEventListener("click", stop);
  el.prompt.addEventListener("change", pushSettings);
  el.fps.addEventListener("change", pushSettings);
  el.askForm.addEventListener("submit", (e) => { e.preventDefault(); ask(); });
  watchBox.attach({
    // the watch list goes to the running session, if there is one (the next one gets it otherwise)
    send: (obj) => {
      const r = run;
      if (!r || !r.live || r.stopping || !r.ws || r.ws.readyState !== WebSocket.OPEN) return false;
      send(r, obj);
      return true;
    },
    showError,
  });

  // Settings from the query string: ?source=camera&fps=2&prompt=...&token=...&autostart=1
  const params = new URLSearchParams(location.search);
  for (const key of ["source", "fps", "prompt", "token"]) {
    if (params.has(key)) el[key].value = params.get(key);
  }
  renderStats(newRun());
  if (params.get("autostart") === "1") start();

  // A read-only view for tests and the console.
  window.casaDemo = {
    snapshot: () => run && {
      sent: run.sent, captioned: run.captioned, dropped: run.dropped, lag_ms: run.lag,
      latencies_ms: [...run.latencies], segments: run.segments.map((s) => ({ ...s })), session_id: run.sessionId,
      reconnects: run.reconnects, statuses: [...run.statuses],
      // answers done, in the order they ended; video_time: the clip time of the frame the answer saw
      answers: run.answers.map((q) => ({
        id: q.id, question: q.question, frame: q.frame, pts: q.pts, text: q.text, status: q.result,
        error: q.error || null, video_time: q.videoTime, latency_ms: q.latency ?? null, ttft_ms: q.ttft ?? null,
      })),
      // the watch list (as the page wants it, and as the server took it), alerts on now, alert events
      ...watchBox.snapshot(),
    },
  };
})();
