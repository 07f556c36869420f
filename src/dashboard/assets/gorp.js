// gorp dashboard: relative times in the viewer's zone, a job's page following the job over
// SSE, and the schedule form's live preview. The pages work without it (times in UTC, a reload
// shows a job's progress).
"use strict";

function relative(ms) {
  const s = Math.round((ms - Date.now()) / 1000);
  const abs = Math.abs(s);
  const rtf = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });
  if (abs < 45) return rtf.format(s, "second");
  if (abs < 2700) return rtf.format(Math.round(s / 60), "minute");
  if (abs < 79200) return rtf.format(Math.round(s / 3600), "hour");
  if (abs < 2592000) return rtf.format(Math.round(s / 86400), "day");
  return new Date(ms).toLocaleDateString();
}

function localTimes(root) {
  for (const el of root.querySelectorAll("time[datetime]")) {
    const ms = Date.parse(el.getAttribute("datetime"));
    if (Number.isNaN(ms)) continue;
    el.title = new Date(ms).toLocaleString();
    el.textContent = relative(ms);
  }
}

function followJob(section) {
  if (!window.EventSource) return;
  const src = new EventSource(section.dataset.live);
  src.addEventListener("render", (e) => {
    // Keep the viewer's open or closed steps as they were.
    const open = new Set([...section.querySelectorAll("details[open][id]")].map((d) => d.id));
    const focused = document.activeElement && document.activeElement.closest("#job-live form");
    if (focused) return; // never replace a form someone is filling in
    section.innerHTML = e.data;
    for (const id of open) {
      const d = document.getElementById(id);
      if (d) d.open = true;
    }
    localTimes(section);
  });
  src.addEventListener("end", () => src.close());
}

function preview(input) {
  const target = document.getElementById(input.dataset.previewTarget);
  const tz = document.getElementById(input.dataset.previewTz);
  let timer = null;
  const run = async () => {
    const q = new URLSearchParams({ when: input.value, timezone: tz ? tz.value : "" });
    try {
      const r = await fetch(input.dataset.preview + "?" + q, { credentials: "same-origin" });
      if (r.ok) target.innerHTML = await r.text();
    } catch (_) { /* offline: leave the last preview */ }
  };
  const later = () => { clearTimeout(timer); timer = setTimeout(run, 250); };
  input.addEventListener("input", later);
  if (tz) tz.addEventListener("input", later);
}

document.addEventListener("DOMContentLoaded", () => {
  localTimes(document);
  setInterval(() => localTimes(document), 30000);
  const live = document.getElementById("job-live");
  if (live && live.dataset.live) followJob(live);
  for (const input of document.querySelectorAll("input[data-preview]")) preview(input);
});
