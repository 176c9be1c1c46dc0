// chatlog web: the time zone toggle, live follow and the replay player. Loaded from chatlog
// itself (no inline script: the Content-Security-Policy forbids it). Archive text is never
// built here: lines arrive as HTML the server escaped (the same function as the page's).
"use strict";

(function () {
  // -- times: UTC (as served, readable without JavaScript) or this browser's zone --------------
  const ZONE_KEY = "chatlog-zone";
  let zone = "utc";
  try { zone = localStorage.getItem(ZONE_KEY) === "local" ? "local" : "utc"; } catch (e) { /* private mode */ }

  function two(n) { return String(n).padStart(2, "0"); }

  function shown(el) {
    if (el.dataset.utc === undefined) el.dataset.utc = el.textContent;
    if (zone === "utc") return el.dataset.utc;
    const when = new Date(el.getAttribute("datetime"));
    if (isNaN(when.getTime())) return el.dataset.utc;
    const clock = two(when.getHours()) + ":" + two(when.getMinutes()) + ":" + two(when.getSeconds());
    if (!el.classList.contains("full")) return clock;
    return when.getFullYear() + "-" + two(when.getMonth() + 1) + "-" + two(when.getDate()) + " " + clock;
  }

  function applyZone(root) {
    for (const el of root.querySelectorAll("time[datetime]")) el.textContent = shown(el);
  }

  function zoneButton() {
    const button = document.getElementById("zone");
    if (!button) return;
    const label = () => {
      button.textContent = zone === "utc" ? "times: UTC" : "times: " + (Intl.DateTimeFormat().resolvedOptions().timeZone || "local");
    };
    button.hidden = false;
    label();
    button.addEventListener("click", () => {
      zone = zone === "utc" ? "local" : "utc";
      try { localStorage.setItem(ZONE_KEY, zone); } catch (e) { /* not kept */ }
      label();
      applyZone(document);
    });
    if (zone !== "utc") applyZone(document);
  }

  // A line the server rendered (and escaped) as HTML, made into an element. A <template> parses
  // without running anything; the CSP would refuse an inline script or handler anyway.
  function lineElement(html) {
    const tpl = document.createElement("template");
    tpl.innerHTML = html;
    return tpl.content.firstElementChild;
  }

  // -- follow a session in progress --------------------------------------------------------------
  function follow() {
    const mark = document.getElementById("follow");
    const lines = document.getElementById("lines");
    const status = document.getElementById("status");
    if (!mark || !lines || !window.EventSource) return;
    const url = "/s/" + encodeURIComponent(mark.dataset.sid) + "/live?after=" +
      encodeURIComponent(mark.dataset.after) + "&began=" + encodeURIComponent(mark.dataset.began);
    const source = new EventSource(url);
    if (status) status.textContent = "In progress: following live.";
    source.addEventListener("line", (ev) => {
      const el = lineElement(JSON.parse(ev.data).html);
      if (!el) return;
      const atBottom = window.innerHeight + window.scrollY >= document.body.scrollHeight - 40;
      applyZone(el);
      lines.appendChild(el);
      if (document.body.classList.contains("playing")) el.classList.add("on");
      if (atBottom) el.scrollIntoView({ block: "end" });
    });
    source.addEventListener("end", (ev) => {
      source.close();
      if (status) {
        const words = document.createElement("template");
        words.innerHTML = JSON.parse(ev.data).html;
        status.textContent = words.content.textContent;
        status.dataset.ended = "1";
      }
    });
    source.addEventListener("error", () => {
      if (status && source.readyState === EventSource.CONNECTING) status.textContent = "In progress: reconnecting\u2026";
    });
  }

  // -- replay: the terminal player's clock ---------------------------------------------------------
  // Each line has its time from the first (data-t, computed by the server as `replay.relative`
  // does). As in replay.py, pauses are capped (-i) before the speed applies, and playback runs
  // on one absolute clock, so a slow frame never makes it drift.
  function player() {
    const box = document.getElementById("player");
    if (!box) return;
    const lines = Array.from(document.querySelectorAll("#lines .l"));
    const play = document.getElementById("play");
    const speedBox = document.getElementById("speed");
    const idleBox = document.getElementById("idle");
    const seek = document.getElementById("seek");
    const where = document.getElementById("where");
    const raw = lines.map((l) => parseFloat(l.dataset.t) || 0);
    let times = [];
    let speed = parseFloat(speedBox.value) || 1;
    let playing = false;
    let shownCount = 0;
    let anchorPos = 0; // seconds of (capped) recording time at anchorReal
    let anchorReal = 0;
    let timer = null;

    function capTimes() {
      const cap = idleBox.value === "" ? null : Math.max(0, parseFloat(idleBox.value));
      let prev = 0, out = 0;
      times = raw.map((t) => {
        out += (cap === null || isNaN(cap)) ? t - prev : Math.min(t - prev, cap);
        prev = t;
        return out;
      });
      seek.max = String(times.length ? times[times.length - 1] : 0);
    }

    function now() { return performance.now() / 1000; }
    function position() { return playing ? anchorPos + (now() - anchorReal) * speed : anchorPos; }

    function render(pos) {
      while (shownCount < lines.length && times[shownCount] <= pos) lines[shownCount++].classList.add("on");
      while (shownCount > 0 && times[shownCount - 1] > pos) lines[--shownCount].classList.remove("on");
      seek.value = String(Math.min(pos, parseFloat(seek.max)));
      where.textContent = shownCount + " / " + lines.length;
      box.dataset.shown = String(shownCount);
    }

    function tick() {
      timer = null;
      const pos = position();
      render(pos);
      if (shownCount >= lines.length) {
        setPlaying(false);
        anchorPos = times.length ? times[times.length - 1] : 0;
        where.textContent = shownCount + " / " + lines.length + " (end)";
        return;
      }
      if (!playing) return;
      const due = (times[shownCount] - pos) / speed;
      timer = setTimeout(tick, Math.max(0, Math.min(due * 1000, 250)));
    }

    function setPlaying(on) {
      if (on && shownCount >= lines.length) { anchorPos = 0; render(0); } // from the start again
      anchorPos = position();
      anchorReal = now();
      playing = on;
      box.dataset.playing = on ? "1" : "0";
      play.textContent = on ? "pause" : "play";
      if (timer !== null) { clearTimeout(timer); timer = null; }
      if (on) tick();
    }

    function jump(pos) {
      anchorPos = pos;
      anchorReal = now();
      render(pos);
      if (playing && timer === null) tick();
    }

    play.addEventListener("click", () => setPlaying(!playing));
    speedBox.addEventListener("change", () => {
      anchorPos = position();
      anchorReal = now();
      speed = parseFloat(speedBox.value) || 1;
      if (playing) { if (timer !== null) clearTimeout(timer); tick(); }
    });
    idleBox.addEventListener("change", () => {
      const at = shownCount; // the same line, on the new clock
      capTimes();
      jump(at > 0 ? times[at - 1] : 0);
    });
    seek.addEventListener("input", () => jump(parseFloat(seek.value) || 0));
    document.addEventListener("keydown", (ev) => {
      const t = ev.target;
      if (ev.key !== " " || (t && (t.tagName === "INPUT" && t.type !== "range" || t.tagName === "SELECT" || t.tagName === "TEXTAREA" || t.tagName === "BUTTON"))) return;
      ev.preventDefault();
      setPlaying(!playing);
    });

    capTimes();
    box.hidden = false;
    document.body.classList.add("playing");
    render(0);
    setPlaying(true);
  }

  function start() {
    zoneButton();
    follow();
    player();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
