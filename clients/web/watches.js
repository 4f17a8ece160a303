// casa-live browser demo: the "alert me when" box and the alert banner. Plain JavaScript, no build
// step; loaded before app.js, which owns the session and calls in here (window.casaWatches).
//
// A watch is a yes/no question the server scores on every captioned frame (docs/protocol.md,
// "Watches"). The page keeps one list for its lifetime (ids w1, w2, ... never reused); adding or
// removing one sends the FULL list in a session.update, since the server replaces the list whole, and
// every new session (Start, a reconnect) gets it as soon as it is set up. Those updates carry only the
// list (leaving it out of the others keeps it) and an event_id: the server's session.updated echoes
// the list it took, and a list it refuses (an error naming that event_id: too long for the model, a
// model that scores no watches) puts the page back to the last list it took, the captions going on.
//
// alert.started shows a banner over the video (the question and the score) until its alert.ended;
// both go into the caption log marked as alerts. Each segment's watch_scores show beside each watch,
// so that a threshold can be tuned by eye. The threshold field applies to the watches added after it
// is set; `?watch_threshold=` in the page's URL fills it.
"use strict";

window.casaWatches = (() => {
  const $ = (id) => document.getElementById(id);
  const MAX_WATCHES = 8; // per session (server/protocol.py MAX_WATCHES)
  const HISTORY_MAX = 200;

  const el = {
    form: $("watch-form"), question: $("watch-question"), threshold: $("watch-threshold"),
    add: $("watch-add"), list: $("watches"), banner: $("alert-banner"), history: $("history"),
  };
  let seq = 0;
  let watches = []; // [{id, question, threshold}] as the page wants them
  let accepted = []; // the list the server last took
  let updateSeq = 0;
  const pending = new Set(); // event ids of the session.updates that carried a list, not answered yet
  const lastScores = new Map(); // watch id -> the latest frame's score
  let active = new Map(); // watch id -> {question, score, frame, pts}: alerts on now
  let log = []; // alert events of the current run, in order: {event, watch_id, question, frame, pts, score, reason}
  let hooks = { send: () => false, showError: () => {} };

  function attach(h) { hooks = { ...hooks, ...h }; }

  // The whole list in a session.update of its own; the event_id names it in the server's answer.
  function push() {
    const id = `watches-${++updateSeq}`;
    const list = watches.map((w) => ({ id: w.id, question: w.question, threshold: w.threshold }));
    if (hooks.send({ type: "session.update", session: { watches: list }, event_id: id })) pending.add(id);
  }

  function readThreshold() {
    const value = Number(el.threshold.value);
    return value > 0 && value < 1 ? value : null;
  }

  function add() {
    const question = el.question.value.trim();
    if (!question) return;
    const threshold = readThreshold();
    if (threshold === null) {
      hooks.showError("The alert threshold must be a number strictly between 0 and 1, e.g. 0.5.");
      return;
    }
    if (watches.length >= MAX_WATCHES) {
      hooks.showError(`At most ${MAX_WATCHES} watches at once: remove one first.`);
      return;
    }
    watches.push({ id: `w${++seq}`, question, threshold });
    el.question.value = "";
    render();
    push();
  }

  function remove(id) {
    watches = watches.filter((w) => w.id !== id);
    render();
    push();
  }

  function render() {
    el.list.replaceChildren(...watches.map((w) => {
      const li = document.createElement("li");
      li.dataset.id = w.id;
      const question = document.createElement("span");
      question.className = "question";
      question.textContent = w.question;
      const meta = document.createElement("span");
      meta.className = "meta";
      const score = lastScores.get(w.id);
      meta.textContent = `≥ ${w.threshold}${score === undefined ? "" : ` · now ${score.toFixed(2)}`}`;
      const button = document.createElement("button");
      button.type = "button";
      button.className = "remove";
      button.textContent = "×";
      button.title = `Stop watching: ${w.question}`;
      button.setAttribute("aria-label", `Remove the watch "${w.question}"`);
      button.addEventListener("click", () => remove(w.id));
      li.append(question, meta, button);
      if (active.has(w.id)) li.classList.add("alerting");
      return li;
    }));
    el.add.disabled = watches.length >= MAX_WATCHES;
  }

  function renderBanner() {
    el.banner.replaceChildren(...[...active.entries()].map(([id, a]) => {
      const line = document.createElement("div");
      line.dataset.id = id;
      const badge = document.createElement("span");
      badge.className = "badge";
      badge.textContent = "alert";
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = a.score.toFixed(2);
      line.append(badge, document.createTextNode(a.question), score);
      return line;
    }));
    el.banner.hidden = active.size === 0;
  }

  function questionOf(id) {
    const w = watches.find((x) => x.id === id) || accepted.find((x) => x.id === id);
    return w ? w.question : id;
  }

  function stamp(seconds) {
    const m = Math.floor(seconds / 60);
    return `${String(m).padStart(2, "0")}:${(seconds - m * 60).toFixed(1).padStart(4, "0")}`;
  }

  // alert.started / alert.ended; `frame` is in the run's numbering (the captions').
  function onAlert(event, frame) {
    const question = questionOf(event.watch_id);
    const started = event.type === "alert.started";
    if (started) active.set(event.watch_id, { question, score: event.score, frame, pts: event.pts });
    else active.delete(event.watch_id);
    log.push({
      event: started ? "started" : "ended", watch_id: event.watch_id, question, frame, pts: event.pts,
      score: event.score, reason: event.reason || null,
    });
    const li = document.createElement("li");
    li.className = `alert ${started ? "started" : "ended"}`;
    li.dataset.watch = event.watch_id;
    const ts = document.createElement("span");
    ts.className = "ts";
    ts.textContent = stamp(event.pts);
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.textContent = started ? "alert" : "alert ended";
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = `${question} · ${event.score.toFixed(2)}${event.reason ? ` (${event.reason.replace("_", " ")})` : ""}`;
    li.append(ts, badge, text);
    el.history.prepend(li);
    while (el.history.children.length > HISTORY_MAX) el.history.lastChild.remove();
    renderBanner();
    render();
  }

  function onScores(scores) {
    if (!scores) return;
    for (const [id, score] of Object.entries(scores)) lastScores.set(id, score);
    render();
  }

  // A new session is set up: it gets the list (a reconnected one scores afresh).
  function sessionStarted() {
    accepted = [];
    if (watches.length) push();
  }

  // session.updated: the list the server took (the effective settings)
  function onUpdated(event) {
    if (event.event_id) pending.delete(event.event_id);
    accepted = (event.settings && event.settings.watches) || [];
  }

  // Whether an error answers one of our list updates; if so the page goes back to the last list taken.
  function onError(event, words) {
    if (!event.event_id || !pending.has(event.event_id)) return false;
    pending.delete(event.event_id);
    watches = accepted.map((w) => ({ id: w.id, question: w.question, threshold: w.threshold }));
    render();
    hooks.showError(`The server did not take the watch list. ${words}`);
    return true;
  }

  // The session ended (closed, dropped): its alerts are over, whatever came of their ends.
  function endSession() {
    active = new Map();
    pending.clear();
    renderBanner();
    render();
  }

  // A new run (Start): a fresh alert log; the list stays.
  function newRun() {
    log = [];
    lastScores.clear();
    endSession();
  }

  el.form.addEventListener("submit", (e) => { e.preventDefault(); add(); });
  const params = new URLSearchParams(location.search);
  if (params.has("watch_threshold")) el.threshold.value = params.get("watch_threshold");
  render();

  return {
    attach, sessionStarted, onAlert, onScores, onUpdated, onError, endSession, newRun,
    snapshot: () => ({
      watches: watches.map((w) => ({ ...w })),
      accepted: accepted.map((w) => ({ ...w })),
      active: [...active.keys()],
      alerts: log.map((a) => ({ ...a })),
    }),
  };
})();
