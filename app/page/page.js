// fusionserve's page: pick a model, classify a clip, label a long video over time, stream a webcam.
// Plain browser JavaScript, no build step; it talks only to the server that sent it.
(() => {
  "use strict";

  const KEY_STORE = "fusionserve.apiKey"; // sessionStorage: this tab only
  const MAX_IN_FLIGHT = 2; // webcam frames sent and not yet answered
  const MIN_SEND_MS = 1000 / 30; // at most 30 frames a second
  const STALE_MS = 250; // a frame is resent after this long without a new camera frame
  const IMPORTANCE_SCALE = 0.05; // a frame's importance bar is full at 5 points of probability (or the largest)
  const KEY_FRAME = 0.01; // the frame whose absence costs most is outlined when that is at least a point
  const PALETTE = [
    "#4e79a7", "#f28e2b", "#e15759", "#59a14f", "#b07aa1",
    "#76b7b2", "#edc948", "#9c755f", "#ff9da7", "#6b6ecf",
    "#8c6d31", "#17becf",
  ];
  const CLOSE_CODES = {
    1000: "the stream was idle",
    1001: "the server is going away",
    1006: "the connection was lost",
    1008: "the server refused the stream",
    1009: "a frame was too big",
    1011: "the server could not answer this stream",
    1013: "the server has too many streams; try again later",
  };

  const $ = (selector) => document.querySelector(selector);
  const ui = {
    model: $("#model"),
    keyForm: $("#key-form"),
    key: $("#api-key"),
    error: $("#error"),
    modelName: $("#model-name"),
    version: $("#model-version"),
    arch: $("#model-arch"),
    input: $("#model-input"),
    device: $("#model-device"),
    metrics: $("#model-metrics"),
    labels: $("#labels"),
    predictCard: $("#predict"),
    drop: $("#drop"),
    files: $("#files"),
    preview: $("#preview"),
    predictStatus: $("#predict-status"),
    predictResult: $("#predict-result"),
    topLabel: $("#top-label"),
    topProb: $("#top-prob"),
    predictBars: $("#predict-bars"),
    thumbs: $("#thumbs"),
    thumbsLegend: $("#thumbs-legend"),
    predictTiming: $("#predict-timing"),
    liveCard: $("#live"),
    webcam: $("#webcam-video"),
    liveLabel: $("#live-label"),
    liveProb: $("#live-prob"),
    liveCount: $("#live-count"),
    liveFps: $("#live-fps"),
    liveLatency: $("#live-latency"),
    liveServer: $("#live-server"),
    liveBars: $("#live-bars"),
    liveStatus: $("#live-status"),
    start: $("#webcam-start"),
    stop: $("#webcam-stop"),
    reset: $("#webcam-reset"),
    timelineCard: $("#timeline-card"),
    timelineForm: $("#timeline-form"),
    timelineFps: $("#timeline-fps"),
    timelineRun: $("#timeline-run"),
    timelineHint: $("#timeline-hint"),
    timelineStatus: $("#timeline-status"),
    timelineResult: $("#timeline-result"),
    timelineSummary: $("#timeline-summary"),
    timeline: $("#timeline"),
    axis: $("#timeline-axis"),
    legend: $("#timeline-legend"),
    segmentInfo: $("#segment-info"),
    segmentBars: $("#segment-bars"),
  };

  const state = {
    models: [],
    model: null,
    video: null, // the chosen video File
    images: [], // or the chosen image Files, in name order
    urls: [], // object URLs to revoke when the files change
    predicting: null, // AbortController of the request in flight
    timing: null,
    thumbsToken: 0,
    timeline: null, // the last timeline answer, while it is of the chosen video
    live: null, // the webcam stream, while open
  };

  // ---- small helpers ----

  function el(tag, attrs = {}, children = []) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "text") node.textContent = value;
      else if (name === "class") node.className = value;
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children) if (child) node.append(child);
    return node;
  }

  const percent = (p) => `${(100 * p).toFixed(1)}%`;
  const seconds = (s) => `${s < 10 ? s.toFixed(1) : Math.round(s)} s`;
  const signed = (v) => `${v >= 0 ? "+" : "−"}${Math.abs(v).toFixed(3)}`;
  const byName = new Intl.Collator(undefined, { numeric: true, sensitivity: "base" });

  function colour(label) {
    const labels = state.model ? state.model.labels : [];
    let i = labels.indexOf(label);
    if (i < 0) i = [...label].reduce((h, c) => (h * 31 + c.charCodeAt(0)) >>> 0, 7);
    return PALETTE[i % PALETTE.length];
  }

  function swatch(label) {
    const node = el("span", { class: "swatch", "aria-hidden": "true" });
    node.style.setProperty("--c", colour(label));
    return node;
  }

  function setBusy(card, busy) {
    if (busy) card.setAttribute("aria-busy", "true");
    else card.removeAttribute("aria-busy");
  }

  // ---- the API key, errors and requests ----

  function apiKey() {
    try {
      return sessionStorage.getItem(KEY_STORE) || "";
    } catch {
      return "";
    }
  }

  function storeKey(key) {
    try {
      if (key) sessionStorage.setItem(KEY_STORE, key);
      else sessionStorage.removeItem(KEY_STORE);
    } catch {
      // storage refused (a private mode): the key lasts until the page is left
    }
    memoryKey = key;
  }

  let memoryKey = apiKey();

  function authHeaders() {
    const key = apiKey() || memoryKey;
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  function showError(message) {
    ui.error.textContent = message;
    ui.error.hidden = false;
  }

  function clearError() {
    ui.error.hidden = true;
    ui.error.textContent = "";
  }

  class RequestFailed extends Error {
    constructor(message, status, code) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  // the words of an error answer: {"error": {"code", "message"}}, KServe's {"error": "..."}, or its text
  function errorWords(response, body, text) {
    if (body && typeof body === "object") {
      const error = body.error;
      if (error && typeof error === "object" && typeof error.message === "string") return error.message;
      if (typeof error === "string") return error;
      if (typeof body.detail === "string") return body.detail;
      if (body.detail !== undefined) return JSON.stringify(body.detail);
    }
    const plain = (text || "").trim();
    if (plain) return plain.length > 600 ? `${plain.slice(0, 600)}…` : plain;
    return `${response.status} ${response.statusText}`.trim();
  }

  async function request(path, options = {}) {
    let response;
    try {
      response = await fetch(path, {
        ...options,
        headers: { Accept: "application/json", ...authHeaders(), ...(options.headers || {}) },
      });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new RequestFailed(`Could not reach the server: ${err.message}`, 0);
    }
    const text = await response.text();
    let body = null;
    try {
      body = text ? JSON.parse(text) : null;
    } catch {
      body = null;
    }
    if (!response.ok) {
      const code = body && body.error && typeof body.error === "object" ? body.error.code : undefined;
      throw new RequestFailed(errorWords(response, body, text), response.status, code);
    }
    if (body === null) throw new RequestFailed(`The server answered ${response.status} without JSON`, response.status);
    return body;
  }

  function failed(err) {
    if (err && err.name === "AbortError") return;
    showError(err && err.message ? err.message : String(err));
    if (err && err.status === 401) keyNeeded();
  }

  function keyNeeded() {
    ui.keyForm.classList.add("needed");
    ui.key.setAttribute("aria-invalid", "true");
    ui.key.focus();
  }

  ui.keyForm.addEventListener("submit", (event) => {
    event.preventDefault();
    storeKey(ui.key.value.trim());
    ui.keyForm.classList.remove("needed");
    ui.key.removeAttribute("aria-invalid");
    loadModels();
  });

  // ---- models ----

  async function loadModels() {
    const wanted = ui.model.value || null;
    ui.model.disabled = true;
    let list;
    try {
      list = await request("/models");
    } catch (err) {
      state.models = [];
      ui.model.replaceChildren(el("option", { value: "", text: err.status === 401 ? "needs the API key" : "unavailable" }));
      chooseModel(null);
      failed(err);
      return;
    }
    clearError();
    ui.keyForm.classList.remove("needed");
    ui.key.removeAttribute("aria-invalid");
    state.models = list.models || [];
    ui.model.replaceChildren(
      ...state.models.map((m) => el("option", { value: m.name, text: m.default ? `${m.name} (default)` : m.name })),
    );
    const names = state.models.map((m) => m.name);
    const pick = names.includes(wanted) ? wanted : names.includes(list.default) ? list.default : names[0];
    ui.model.value = pick || "";
    ui.model.disabled = state.models.length === 0;
    chooseModel(state.models.find((m) => m.name === pick) || null);
  }

  ui.model.addEventListener("change", () => {
    chooseModel(state.models.find((m) => m.name === ui.model.value) || null);
  });

  function chooseModel(model) {
    const changed = state.model !== model;
    state.model = model;
    renderModel(model);
    const ready = model !== null;
    ui.files.disabled = !ready;
    ui.drop.classList.toggle("disabled", !ready);
    ui.start.disabled = !ready || state.live !== null;
    updateTimelineButton();
    if (!changed) return;
    clearTimeline();
    if (ready && (state.video || state.images.length)) predict();
    else if (!ready) ui.predictResult.hidden = true;
    if (state.live) {
      stopLive("the model changed");
      if (ready) startLive();
    }
  }

  function renderModel(model) {
    const fields = [ui.version, ui.arch, ui.input, ui.device, ui.metrics];
    if (!model) {
      ui.modelName.textContent = "";
      for (const field of fields) field.textContent = "—";
      ui.labels.replaceChildren();
      return;
    }
    ui.modelName.textContent = model.name;
    ui.version.textContent = `${model.version}${model.created_at ? ` · ${model.created_at.slice(0, 10)}` : ""}`;
    const arch = model.arch || {};
    const head = arch.head || {};
    const encoder = arch.encoder && arch.encoder.name ? arch.encoder.name.replace(/_/g, " ") : "CNN";
    let headText = head.name || "head";
    if (head.pooling) headText += ` (${head.pooling} pooling)`;
    if (head.bidirectional) headText += " (bidirectional)";
    ui.arch.textContent = `${encoder} + ${headText}`;
    const input = model.input || {};
    const range =
      input.min_frames && input.max_frames && input.min_frames !== input.max_frames
        ? ` (${input.min_frames}–${input.max_frames})`
        : "";
    ui.input.textContent = `${input.width} × ${input.height} × ${input.channels}, ${input.frames} frames${range}`;
    ui.device.textContent = [model.device, model.precision, model.streams && `streams: ${model.streams.mode}`]
      .filter(Boolean)
      .join(" · ");
    ui.metrics.textContent = metricsText(model.metrics || {});
    ui.labels.replaceChildren(
      ...model.labels.map((label) => el("li", { "data-label": label }, [swatch(label), label])),
    );
  }

  function metricsText(metrics) {
    const test = metrics.test && typeof metrics.test === "object" ? metrics.test : metrics;
    const parts = [];
    if (typeof test.accuracy === "number") parts.push(`accuracy ${percent(test.accuracy)}`);
    if (typeof test.macro_f1 === "number") parts.push(`macro F1 ${test.macro_f1.toFixed(3)}`);
    if (typeof test.loss === "number") parts.push(`loss ${test.loss.toFixed(3)}`);
    if (typeof test.clips === "number") parts.push(`${test.clips} clips`);
    if (!parts.length) {
      for (const [name, value] of Object.entries(test)) {
        if (typeof value === "number") parts.push(`${name} ${Number.isInteger(value) ? value : value.toFixed(3)}`);
      }
    }
    return parts.length ? parts.join(" · ") : "none recorded";
  }

  // ---- probability bars ----

  function renderBars(list, probabilities) {
    const entries = Object.entries(probabilities || {}).sort((a, b) => b[1] - a[1]);
    const old = new Map([...list.children].map((item) => [item.dataset.label, item]));
    const items = entries.map(([label, p], rank) => {
      let item = old.get(label);
      old.delete(label);
      if (!item) {
        item = el("li", { class: "bar", "data-label": label }, [
          el("span", { class: "bar-name" }, [swatch(label), el("span", { text: label })]),
          el("span", { class: "bar-track", "aria-hidden": "true" }, [el("span", { class: "bar-fill" })]),
          el("span", { class: "bar-value" }),
        ]);
      }
      item.dataset.probability = String(p);
      item.classList.toggle("top", rank === 0);
      item.querySelector(".bar-fill").style.width = `${Math.max(0, Math.min(1, p)) * 100}%`;
      item.querySelector(".bar-value").textContent = percent(p);
      return item;
    });
    for (const item of old.values()) item.remove();
    // move only what is out of place, so unchanged rows stay put
    items.forEach((item, i) => {
      if (list.children[i] !== item) list.insertBefore(item, list.children[i] || null);
    });
  }

  // ---- files: drop zone and file input ----

  const isVideo = (file) =>
    file.type.startsWith("video/") || /\.(mp4|m4v|mov|webm|mkv|avi|ogv|mpe?g)$/i.test(file.name);

  ui.files.addEventListener("change", () => {
    takeFiles([...ui.files.files]);
  });

  for (const name of ["dragenter", "dragover"]) {
    ui.drop.addEventListener(name, (event) => {
      event.preventDefault();
      if (event.dataTransfer) event.dataTransfer.dropEffect = ui.files.disabled ? "none" : "copy";
      ui.drop.classList.add("dragging");
    });
  }
  ui.drop.addEventListener("dragleave", (event) => {
    if (!ui.drop.contains(event.relatedTarget)) ui.drop.classList.remove("dragging");
  });
  ui.drop.addEventListener("drop", (event) => {
    event.preventDefault();
    ui.drop.classList.remove("dragging");
    if (ui.files.disabled) return;
    takeFiles([...((event.dataTransfer && event.dataTransfer.files) || [])]);
  });
  // a file dropped beside the zone is not opened in place of the page
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());

  function takeFiles(files) {
    if (!files.length) return;
    const videos = files.filter(isVideo);
    if (videos.length && (videos.length > 1 || videos.length !== files.length)) {
      showError("Choose one video, or several images: not both, and not several videos.");
      return;
    }
    clearError();
    for (const url of state.urls) URL.revokeObjectURL(url);
    state.urls = [];
    state.video = videos[0] || null;
    state.images = state.video ? [] : files.slice().sort((a, b) => byName.compare(a.name, b.name));
    state.urls = state.video ? [URL.createObjectURL(state.video)] : state.images.map((f) => URL.createObjectURL(f));
    if (state.video) {
      ui.preview.src = state.urls[0];
      ui.preview.hidden = false;
    } else {
      ui.preview.removeAttribute("src");
      ui.preview.hidden = true;
    }
    clearTimeline();
    updateTimelineButton();
    predict();
  }

  // ---- a clip's prediction ----

  async function predict() {
    const model = state.model;
    if (!model || (!state.video && !state.images.length)) return;
    if (state.predicting) state.predicting.abort();
    const controller = new AbortController();
    state.predicting = controller;
    const form = new FormData();
    if (state.video) form.append("video", state.video, state.video.name);
    else for (const image of state.images) form.append("frames", image, image.name);
    const what = state.video ? state.video.name : `${state.images.length} image${state.images.length > 1 ? "s" : ""}`;
    ui.predictStatus.textContent = `Classifying ${what} with ${model.name}…`;
    setBusy(ui.predictCard, true);
    const top = Math.max(1, Math.min(1000, model.labels.length));
    const path = `/models/${encodeURIComponent(model.name)}/predict?explain=frames&top_k=${top}`;
    try {
      const answer = await request(path, { method: "POST", body: form, signal: controller.signal });
      if (state.predicting !== controller) return;
      clearError();
      ui.predictStatus.textContent = `${what} · ${answer.model} v${answer.model_version}`;
      showPrediction(answer);
    } catch (err) {
      if (state.predicting !== controller) return;
      ui.predictStatus.textContent = "";
      failed(err);
    } finally {
      if (state.predicting === controller) {
        state.predicting = null;
        setBusy(ui.predictCard, false);
      }
    }
  }

  function showPrediction(answer) {
    ui.predictResult.hidden = false;
    ui.topLabel.textContent = answer.label;
    ui.topProb.textContent = percent(answer.probabilities[answer.label] || 0);
    renderBars(ui.predictBars, answer.probabilities);
    const t = answer.timing_ms || {};
    const ms = (v) => (typeof v === "number" ? v.toFixed(1) : "?");
    ui.predictTiming.textContent =
      `${answer.frames} frames · ${ms(t.total)} ms on the server ` +
      `(decode ${ms(t.decode)}, queue ${ms(t.queue)}, inference ${ms(t.inference)})`;
    renderThumbs(answer);
  }

  function meter(kind, value, scale, text) {
    const node = el("span", { class: `meter ${kind}${value < 0 ? " neg" : ""}`, role: "img", "aria-label": text });
    const fill = el("span", { class: "meter-fill" });
    fill.style.width = `${Math.min(1, Math.abs(value) / scale) * 100}%`;
    node.append(fill);
    return node;
  }

  function renderThumbs(answer) {
    const count = answer.frames;
    const importance = numbers(answer.frame_importance, count);
    const attention = numbers(answer.attention, count);
    const token = ++state.thumbsToken;
    // importance is a change of probability: bars are to a fixed scale (a full bar: IMPORTANCE_SCALE or
    // the largest change, whichever is more), so that changes of a thousandth do not look like a lot
    const largest = importance ? Math.max(...importance.map(Math.abs)) : 0;
    const impScale = Math.max(IMPORTANCE_SCALE, largest);
    const attScale = attention ? Math.max(1e-9, ...attention) : 1;
    const top = importance ? Math.max(...importance) : 0;
    const keyFrame = top >= KEY_FRAME ? importance.indexOf(top) : -1;
    ui.thumbs.dataset.drawn = "false";
    const key = (kind) => el("span", { class: `key-${kind}`, "aria-hidden": "true" });
    const legend = [];
    if (importance) {
      legend.push(
        `Under each frame: how much p(${answer.label}) falls without it`,
        key("imp"),
        " or rises",
        key("neg"),
        ` (full bar: ${(100 * impScale).toFixed(1)} points; largest change here: ${(100 * largest).toFixed(2)} points)`,
      );
    }
    if (attention) legend.push(importance ? "; attention weight" : "Under each frame: its attention weight", key("att"));
    ui.thumbsLegend.replaceChildren(...legend);
    const canvases = [];
    const waits = [];
    const items = [];
    for (let i = 0; i < count; i += 1) {
      const notes = [`frame ${i + 1}`];
      if (importance) notes.push(`importance ${signed(importance[i])}`);
      if (attention) notes.push(`attention ${attention[i].toFixed(3)}`);
      const label = notes.join(", ");
      let picture;
      if (state.video) {
        picture = el("canvas", { class: "thumb-img pending", width: 64, height: 64, role: "img", "aria-label": label });
        canvases.push(picture);
      } else {
        const url = state.urls[Math.min(i, state.urls.length - 1)];
        picture = el("img", { class: "thumb-img", src: url, alt: label });
        waits.push(picture.decode().catch(() => undefined));
      }
      const item = el("li", { class: "thumb", "data-index": i, title: label }, [picture]);
      if (importance) {
        item.dataset.importance = String(importance[i]);
        item.append(meter("importance", importance[i], impScale, `importance ${signed(importance[i])}`));
      }
      if (attention) {
        item.dataset.attention = String(attention[i]);
        item.append(meter("attention", attention[i], attScale, `attention ${attention[i].toFixed(3)}`));
      }
      if (i === keyFrame && count > 1) item.classList.add("pivotal");
      item.append(el("span", { class: "thumb-n", text: String(i + 1), "aria-hidden": "true" }));
      items.push(item);
    }
    ui.thumbs.replaceChildren(...items);
    const drawn = state.video ? drawVideoFrames(state.urls[0], canvases, token) : Promise.all(waits);
    drawn.finally(() => {
      if (state.thumbsToken === token) ui.thumbs.dataset.drawn = "true";
    });
  }

  function numbers(values, count) {
    if (!Array.isArray(values) || values.length !== count) return null;
    return values.every((v) => typeof v === "number" && Number.isFinite(v)) ? values : null;
  }

  function once(target, names, ms) {
    return new Promise((resolve) => {
      const done = (event) => {
        clearTimeout(timer);
        for (const name of names) target.removeEventListener(name, done);
        resolve(event ? event.type : "timeout");
      };
      const timer = setTimeout(() => done(null), ms);
      for (const name of names) target.addEventListener(name, done);
    });
  }

  function framePresented(video) {
    return new Promise((resolve) => {
      const timer = setTimeout(resolve, 500);
      if (typeof video.requestVideoFrameCallback !== "function") return;
      video.requestVideoFrameCallback(() => {
        clearTimeout(timer);
        resolve();
      });
    });
  }

  // the server samples a video's frames one per equal segment, at its centre: seek to those times
  async function drawVideoFrames(url, canvases, token) {
    const video = document.createElement("video");
    video.muted = true;
    video.playsInline = true;
    video.preload = "auto";
    video.src = url;
    try {
      if ((await once(video, ["loadeddata", "error"], 8000)) !== "loadeddata") return;
      const duration = video.duration;
      if (!Number.isFinite(duration) || duration <= 0) return;
      const count = canvases.length;
      const scale = Math.min(1, 160 / Math.max(video.videoWidth, video.videoHeight, 1));
      for (let i = 0; i < count; i += 1) {
        if (state.thumbsToken !== token) return;
        const time = Math.min(((i + 0.5) * duration) / count, Math.max(0, duration - 0.001));
        if (Math.abs(video.currentTime - time) > 1e-4) {
          // "seeked" can come before the new frame is there to draw: wait for it to be presented too
          const presented = framePresented(video);
          video.currentTime = time;
          if ((await once(video, ["seeked", "error"], 4000)) !== "seeked") return;
          await presented;
        }
        const canvas = canvases[i];
        canvas.width = Math.max(1, Math.round(video.videoWidth * scale));
        canvas.height = Math.max(1, Math.round(video.videoHeight * scale));
        canvas.getContext("2d").drawImage(video, 0, 0, canvas.width, canvas.height);
        canvas.classList.remove("pending");
      }
    } finally {
      video.removeAttribute("src");
      video.load();
    }
  }

  // ---- the timeline of a long video ----

  function updateTimelineButton() {
    const ready = Boolean(state.model && state.video);
    ui.timelineRun.disabled = !ready;
    ui.timelineHint.textContent = state.video ? `Video: ${state.video.name}` : "Choose a video above first.";
  }

  function clearTimeline() {
    state.timeline = null;
    ui.timelineResult.hidden = true;
    ui.timeline.replaceChildren();
    ui.segmentBars.replaceChildren();
    ui.timelineStatus.textContent = "";
  }

  ui.timelineForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const model = state.model;
    const video = state.video;
    if (!model || !video) return;
    if (!ui.timelineFps.checkValidity()) {
      ui.timelineFps.reportValidity();
      return;
    }
    const fps = ui.timelineFps.value.trim();
    const form = new FormData();
    form.append("video", video, video.name);
    const query = fps ? `?fps=${encodeURIComponent(fps)}` : "";
    ui.timelineRun.disabled = true;
    setBusy(ui.timelineCard, true);
    ui.timelineStatus.textContent = `Labelling ${video.name} over time…`;
    try {
      const answer = await request(`/models/${encodeURIComponent(model.name)}/timeline${query}`, {
        method: "POST",
        body: form,
      });
      if (state.video !== video || state.model !== model) return;
      clearError();
      ui.timelineStatus.textContent = "";
      renderTimeline(answer);
    } catch (err) {
      ui.timelineStatus.textContent = "";
      failed(err);
    } finally {
      setBusy(ui.timelineCard, false);
      updateTimelineButton();
    }
  });

  function renderTimeline(answer) {
    state.timeline = answer;
    const segments = answer.segments || [];
    const duration = Math.max(answer.duration_s || 0, ...segments.map((s) => s.end_s), 1e-6);
    // lanes: a segment goes in the first lane whose last segment has ended, so overlapping windows show
    const ends = [];
    const lanes = segments.map((s) => {
      let lane = ends.findIndex((end) => end <= s.start_s + 1e-6);
      if (lane < 0) lane = ends.push(0) - 1;
      ends[lane] = s.end_s;
      return lane;
    });
    ui.timeline.style.setProperty("--lanes", String(Math.max(1, ends.length)));
    const buttons = segments.map((s, i) => {
      const text = `${seconds(s.start_s)}–${seconds(s.end_s)}: ${s.label} ${percent(s.probabilities[s.label] || 0)}`;
      const button = el(
        "button",
        {
          type: "button",
          class: "segment",
          "data-index": i,
          "data-label": s.label,
          "aria-pressed": "false",
          "aria-label": text,
          title: text,
          tabindex: i === 0 ? 0 : -1,
        },
        [s.label],
      );
      button.style.left = `${(100 * s.start_s) / duration}%`;
      button.style.width = `${(100 * Math.max(0, s.end_s - s.start_s)) / duration}%`;
      button.style.setProperty("--lane", String(lanes[i]));
      button.style.setProperty("--c", colour(s.label));
      button.addEventListener("click", () => selectSegment(i, false));
      return button;
    });
    const playhead = el("span", { class: "playhead", "aria-hidden": "true", hidden: true });
    ui.timeline.replaceChildren(...buttons, playhead);
    const ticks = [0, 0.25, 0.5, 0.75, 1].map((f) => {
      const tick = el("span", { text: seconds(f * duration) });
      tick.style.left = `${f * 100}%`;
      return tick;
    });
    ui.axis.replaceChildren(...ticks);
    const seen = [...new Set(segments.map((s) => s.label))];
    ui.legend.replaceChildren(...seen.map((label) => el("li", { "data-label": label }, [swatch(label), label])));
    ui.timelineSummary.textContent =
      `${segments.length} segment${segments.length === 1 ? "" : "s"} · ${answer.frames} frames sampled at ` +
      `${answer.fps} per second over ${seconds(duration)} · ${answer.model}`;
    ui.segmentInfo.textContent = "Choose a segment to see its probabilities.";
    ui.segmentBars.replaceChildren();
    ui.timelineResult.hidden = false;
  }

  function selectSegment(index, focus) {
    const answer = state.timeline;
    const buttons = [...ui.timeline.querySelectorAll(".segment")];
    if (!answer || !buttons[index]) return;
    buttons.forEach((button, i) => {
      button.setAttribute("aria-pressed", String(i === index));
      button.tabIndex = i === index ? 0 : -1;
    });
    if (focus) buttons[index].focus();
    const s = answer.segments[index];
    ui.segmentInfo.replaceChildren(
      el("strong", { text: s.label }),
      ` ${percent(s.probabilities[s.label] || 0)} · ${seconds(s.start_s)} to ${seconds(s.end_s)} (segment ${index + 1} of ${buttons.length})`,
    );
    ui.segmentInfo.dataset.index = String(index);
    renderBars(ui.segmentBars, s.probabilities);
    if (!ui.preview.hidden && Number.isFinite(ui.preview.duration)) ui.preview.currentTime = s.start_s;
  }

  ui.timeline.addEventListener("keydown", (event) => {
    const buttons = [...ui.timeline.querySelectorAll(".segment")];
    const at = buttons.indexOf(document.activeElement);
    if (at < 0) return;
    const moves = { ArrowLeft: at - 1, ArrowUp: at - 1, ArrowRight: at + 1, ArrowDown: at + 1, Home: 0, End: buttons.length - 1 };
    if (!(event.key in moves)) return;
    event.preventDefault();
    selectSegment(Math.max(0, Math.min(buttons.length - 1, moves[event.key])), true);
  });

  ui.preview.addEventListener("timeupdate", () => {
    const playhead = ui.timeline.querySelector(".playhead");
    const answer = state.timeline;
    if (!playhead || !answer) return;
    const duration = Math.max(answer.duration_s || 0, 1e-6);
    playhead.hidden = false;
    playhead.style.left = `${Math.min(100, (100 * ui.preview.currentTime) / duration)}%`;
  });

  // ---- the webcam stream ----

  function streamUrl(model) {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    return `${scheme}//${location.host}/models/${encodeURIComponent(model.name)}/stream`;
  }

  function liveButtons() {
    const open = state.live !== null;
    ui.start.disabled = open || !state.model;
    ui.stop.disabled = !open;
    ui.reset.disabled = !open;
  }

  async function startLive() {
    const model = state.model;
    if (!model || state.live) return;
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      showError("This browser cannot open a camera for this page (a camera needs https or localhost).");
      return;
    }
    clearError();
    ui.start.disabled = true;
    ui.liveStatus.textContent = "Opening the camera…";
    let media;
    try {
      media = await navigator.mediaDevices.getUserMedia({
        video: { width: { ideal: 640 }, height: { ideal: 480 } },
        audio: false,
      });
    } catch (err) {
      ui.liveStatus.textContent = "";
      liveButtons();
      showError(`The camera could not be opened: ${err.message || err.name}`);
      return;
    }
    if (state.model !== model || state.live) {
      for (const track of media.getTracks()) track.stop();
      return;
    }
    const protocols = ["fusionserve"];
    const key = apiKey() || memoryKey;
    if (key) protocols.push(`bearer.${key}`);
    let socket;
    try {
      socket = new WebSocket(streamUrl(model), protocols);
    } catch (err) {
      for (const track of media.getTracks()) track.stop();
      liveButtons();
      showError(`The stream could not be opened: ${err.message}`);
      return;
    }
    const canvas = document.createElement("canvas");
    canvas.width = model.input.width;
    canvas.height = model.input.height;
    const live = {
      model,
      socket,
      media,
      canvas,
      context: canvas.getContext("2d"),
      sent: [], // send times of the frames not yet answered, in order
      answered: [], // times of the last answers, for the rate
      count: 0,
      rtt: null,
      fresh: true,
      encoding: false,
      lastSent: 0,
      timer: 0,
      stopping: false,
    };
    state.live = live;
    liveButtons();
    ui.webcam.srcObject = media;
    ui.webcam.play().catch(() => undefined);
    watchFrames(live);
    socket.addEventListener("open", () => {
      if (state.live !== live) return;
      ui.liveStatus.textContent = `Streaming to ${model.name} (${model.input.width} × ${model.input.height} JPEG frames)`;
      live.timer = setInterval(() => pump(live), 15);
      pump(live);
    });
    socket.addEventListener("message", (event) => onAnswer(live, event.data));
    socket.addEventListener("close", (event) => onClosed(live, event));
  }

  function watchFrames(live) {
    const video = ui.webcam;
    if (typeof video.requestVideoFrameCallback !== "function") return;
    const next = () => {
      if (state.live !== live) return;
      live.fresh = true;
      video.requestVideoFrameCallback(next);
    };
    video.requestVideoFrameCallback(next);
  }

  // the next frame, while fewer than MAX_IN_FLIGHT are unanswered
  function pump(live) {
    if (state.live !== live || live.socket.readyState !== WebSocket.OPEN || live.encoding) return;
    if (live.sent.length >= MAX_IN_FLIGHT) return;
    const video = ui.webcam;
    const now = performance.now();
    if (now - live.lastSent < MIN_SEND_MS || video.readyState < 2 || !video.videoWidth) return;
    if (!live.fresh && now - live.lastSent < STALE_MS) return;
    // the centre of the camera's picture at the model's aspect, scaled to its input size
    const { width, height } = live.canvas;
    const vw = video.videoWidth;
    const vh = video.videoHeight;
    const aspect = width / height;
    const sw = Math.min(vw, vh * aspect);
    const sh = sw / aspect;
    live.context.drawImage(video, (vw - sw) / 2, (vh - sh) / 2, sw, sh, 0, 0, width, height);
    live.fresh = false;
    live.encoding = true;
    live.lastSent = now;
    live.canvas.toBlob(
      async (blob) => {
        // sent as an ArrayBuffer: the same binary message, and one the browser's devtools show
        const bytes = blob ? await blob.arrayBuffer().catch(() => null) : null;
        live.encoding = false;
        if (!bytes || state.live !== live || live.socket.readyState !== WebSocket.OPEN) return;
        live.sent.push(performance.now());
        live.socket.send(bytes);
      },
      "image/jpeg",
      0.9,
    );
  }

  function onAnswer(live, data) {
    if (state.live !== live || typeof data !== "string") return;
    let message;
    try {
      message = JSON.parse(data);
    } catch {
      return;
    }
    const now = performance.now();
    const sentAt = typeof message.frame === "number" ? live.sent.shift() : undefined;
    if (message.error) {
      const error = message.error;
      const words = typeof error === "object" ? error.message : String(error);
      ui.liveStatus.textContent =
        typeof message.frame === "number" ? `Frame ${message.frame}: ${words}` : `The server said: ${words}`;
      pump(live);
      return;
    }
    live.count += 1;
    live.answered.push(now);
    while (live.answered.length > 2 && now - live.answered[0] > 2000) live.answered.shift();
    if (sentAt !== undefined) live.rtt = live.rtt === null ? now - sentAt : 0.8 * live.rtt + 0.2 * (now - sentAt);
    ui.liveCount.textContent = String(live.count);
    const span = live.answered.length > 1 ? now - live.answered[0] : 0;
    ui.liveFps.textContent = span > 0 ? `${((1000 * (live.answered.length - 1)) / span).toFixed(1)} /s` : "—";
    ui.liveLatency.textContent = live.rtt === null ? "—" : `${Math.round(live.rtt)} ms`;
    const t = message.timing_ms || {};
    ui.liveServer.textContent =
      typeof t.total === "number" ? `${t.total.toFixed(1)} ms${message.batch ? ` · batch ${message.batch}` : ""}` : "—";
    ui.liveLabel.textContent = message.label;
    ui.liveProb.textContent = percent((message.probabilities || {})[message.label] || 0);
    renderBars(ui.liveBars, message.probabilities);
    pump(live);
  }

  function onClosed(live, event) {
    if (state.live !== live) return;
    const stopping = live.stopping;
    teardown(live);
    if (stopping) return;
    const reason = event.reason || CLOSE_CODES[event.code] || "the stream closed";
    ui.liveStatus.textContent = `Stopped (close code ${event.code}).`;
    showError(reason);
    if (event.code === 1008 && /key/i.test(reason)) keyNeeded();
  }

  function teardown(live) {
    clearInterval(live.timer);
    for (const track of live.media.getTracks()) track.stop();
    if (ui.webcam.srcObject === live.media) ui.webcam.srcObject = null;
    if (state.live === live) state.live = null;
    liveButtons();
  }

  function stopLive(why) {
    const live = state.live;
    if (!live) return;
    live.stopping = true;
    if (live.socket.readyState === WebSocket.OPEN || live.socket.readyState === WebSocket.CONNECTING) {
      live.socket.close(1000, "stopped by the page");
    }
    teardown(live);
    ui.liveStatus.textContent = `Stopped${why ? `: ${why}` : ""}.`;
  }

  function resetLive() {
    const live = state.live;
    if (!live || live.socket.readyState !== WebSocket.OPEN) return;
    live.socket.send(JSON.stringify({ reset: true }));
    live.count = 0;
    live.answered = [];
    ui.liveCount.textContent = "0";
    ui.liveFps.textContent = "—";
    ui.liveStatus.textContent = "Reset: the model starts over from the next frame.";
  }

  ui.start.addEventListener("click", () => startLive());
  ui.stop.addEventListener("click", () => stopLive(""));
  ui.reset.addEventListener("click", resetLive);
  window.addEventListener("pagehide", () => stopLive(""));

  // ---- start ----

  ui.key.value = apiKey();
  loadModels();
})();
