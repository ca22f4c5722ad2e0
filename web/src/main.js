// facegan explore: the page's app. Talks to the JSON API of `facegan explore` (docs/explore.md)
// on the same origin and shows faces with three.js. Bundled by web/build.mjs into
// src/facegan/explore/static/explore.js; edit this file, not the bundle.

import {
  BufferAttribute,
  BufferGeometry,
  Color,
  DirectionalLight,
  DoubleSide,
  HemisphereLight,
  Mesh,
  MeshBasicMaterial,
  MeshStandardMaterial,
  PerspectiveCamera,
  Scene,
  Spherical,
  Vector3,
  WebGLRenderer,
} from "three";
import { OrbitControls } from "three/examples/jsm/controls/OrbitControls.js";

const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------- API

/** One JSON request; throws Error(server's one-line message) on any non-2xx answer. */
async function api(path, body, raw = false) {
  const init = body === undefined ? {} : {
    method: "POST",
    headers: { "Content-Type": raw ? "application/octet-stream" : "application/json" },
    body: raw ? body : JSON.stringify(body),
  };
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    throw new Error(`no answer from the server (${e.message}); is \`facegan explore\` still running?`);
  }
  let data = null;
  try {
    data = await response.json();
  } catch {
    // a non-JSON answer (e.g. a proxy's error page): reported below by status code
  }
  if (!response.ok) {
    throw new Error(data && data.error ? data.error : `HTTP ${response.status} ${response.statusText}`);
  }
  return data;
}

/** base64 of little-endian bytes -> typed array (the browser's own byte order is little-endian everywhere three.js runs). */
function decode(b64, Type) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return new Type(bytes.buffer);
}

// ---------------------------------------------------------------- error colors

// viridis, 9 stops: perceptually even and readable in gray
const VIRIDIS = [
  [0.267, 0.005, 0.329], [0.279, 0.175, 0.483], [0.230, 0.322, 0.546], [0.173, 0.449, 0.558],
  [0.128, 0.567, 0.551], [0.153, 0.680, 0.510], [0.369, 0.789, 0.383], [0.678, 0.864, 0.190],
  [0.993, 0.906, 0.144],
];

/** Color of s in [0, 1] as [r, g, b] in [0, 1]. */
function viridis(s) {
  const x = Math.min(Math.max(s, 0), 1) * (VIRIDIS.length - 1);
  const i = Math.min(Math.floor(x), VIRIDIS.length - 2);
  const f = x - i;
  return VIRIDIS[i].map((a, k) => a + f * (VIRIDIS[i + 1][k] - a));
}

/** Top of the color scale: the 99th percentile, so a few outlier vertices don't wash out the map. */
function errorScale(errors) {
  const sorted = Float32Array.from(errors).sort();
  return Math.max(sorted[Math.floor(0.99 * (sorted.length - 1))], 1e-6);
}

function cssGradient() {
  return `linear-gradient(to top, ${VIRIDIS.map((c, i) =>
    `rgb(${c.map((v) => Math.round(v * 255)).join(",")}) ${(100 * i) / (VIRIDIS.length - 1)}%`).join(", ")})`;
}

// ---------------------------------------------------------------- 3D view

class Viewer {
  /** A three.js scene in `container` showing one mesh of a fixed topology (triangles: Uint32Array F*3). */
  constructor(container, triangles, nVertices) {
    this.container = container;
    this.nVertices = nVertices;
    this.renderer = new WebGLRenderer({ antialias: true });
    this.renderer.setPixelRatio(window.devicePixelRatio);
    container.prepend(this.renderer.domElement);
    this.scene = new Scene();
    this.scene.background = new Color(0xf4f4f2);
    this.camera = new PerspectiveCamera(30, 1, 1, 10000);
    // light moves with the camera so the side you look at is always lit
    const key = new DirectionalLight(0xffffff, 2.2);
    key.position.set(0.4, 0.6, 1);
    this.camera.add(key);
    this.scene.add(this.camera, new HemisphereLight(0xffffff, 0x8d8d99, 1.1));

    this.geometry = new BufferGeometry();
    this.geometry.setAttribute("position", new BufferAttribute(new Float32Array(nVertices * 3), 3));
    this.geometry.setAttribute("color", new BufferAttribute(new Float32Array(nVertices * 3), 3));
    this.geometry.setIndex(new BufferAttribute(triangles, 1));
    this.material = new MeshStandardMaterial({ color: 0xd9cfc4, roughness: 0.65, metalness: 0, side: DoubleSide });
    this.mesh = new Mesh(this.geometry, this.material);
    // wireframe drawn over the shaded surface (shares the geometry, so it follows every update)
    this.wire = new Mesh(this.geometry, new MeshBasicMaterial({
      color: 0x202020, wireframe: true, transparent: true, opacity: 0.22, depthWrite: false,
    }));
    this.wire.visible = false;
    this.scene.add(this.mesh, this.wire);

    this.controls = new OrbitControls(this.camera, this.renderer.domElement);
    // render on demand (no animation loop): the page stays idle when nobody touches it
    this.controls.addEventListener("change", () => this.render());
    new ResizeObserver(() => this.resize()).observe(container);
    this.framed = false;
    this.resize();
  }

  resize() {
    const { clientWidth: w, clientHeight: h } = this.container;
    if (!w || !h) return;
    this.renderer.setSize(w, h);
    this.camera.aspect = w / h;
    this.camera.updateProjectionMatrix();
    this.render();
  }

  render() {
    this.renderer.render(this.scene, this.camera);
    const offset = new Vector3().subVectors(this.camera.position, this.controls.target);
    const s = new Spherical().setFromVector3(offset);
    const d = this.container.dataset;
    d.cameraDistance = offset.length().toFixed(1);
    d.cameraAzimuth = ((s.theta * 180) / Math.PI).toFixed(1);
    d.cameraPolar = ((s.phi * 180) / Math.PI).toFixed(1);
  }

  /** Show vertices (Float32Array V*3, mm); errors (Float32Array V, mm) color the surface when given. */
  show(vertices, errors, showErrors) {
    const pos = this.geometry.getAttribute("position");
    pos.array.set(vertices);
    pos.needsUpdate = true;
    this.geometry.computeVertexNormals();
    this.geometry.computeBoundingSphere();
    const colored = Boolean(errors && showErrors);
    if (colored) {
      const top = errorScale(errors);
      const col = this.geometry.getAttribute("color");
      for (let i = 0; i < errors.length; i++) col.array.set(viridis(errors[i] / top), 3 * i);
      col.needsUpdate = true;
    }
    if (this.material.vertexColors !== colored) {
      this.material.vertexColors = colored;
      this.material.color.set(colored ? 0xffffff : 0xd9cfc4);
      this.material.needsUpdate = true;
    }
    if (!this.framed) this.resetView();
    this.container.dataset.vertexCount = String(pos.count);
    this.container.dataset.errorMap = colored ? "on" : "off";
    this.render();
  }

  /** Camera in front of the face (+z, y up), the whole mesh in view. */
  resetView() {
    const { center, radius } = this.geometry.boundingSphere;
    const dist = (1.15 * radius) / Math.sin((this.camera.fov * Math.PI) / 360);
    this.camera.near = dist / 100;
    this.camera.far = dist * 100;
    this.camera.position.set(center.x, center.y, center.z + dist);
    this.camera.updateProjectionMatrix();
    this.controls.target.copy(center);
    this.controls.update();
    this.framed = true;
    this.render();
  }

  setWireframe(on) {
    this.wire.visible = on;
    this.container.dataset.wireframe = on ? "on" : "off";
    this.render();
  }
}

// ---------------------------------------------------------------- app state

const state = {
  model: null,
  viewer: null,
  faces: new Map(), // id -> Face (decoded: vertices, errors typed arrays)
  order: [], // ids, oldest first
  current: null, // id shown
  a: null,
  b: null,
  busy: 0,
  interp: { pending: null, running: false, lastId: null },
};

function setBusy(delta) {
  state.busy += delta;
  document.body.dataset.busy = String(state.busy);
  for (const el of document.querySelectorAll("[data-needs-face]")) updateEnabled(el);
}

/** Status line (what just happened); errors go to the alert line and stay until the next success. */
function say(text) {
  $("status").textContent = text;
}

function fail(error) {
  const el = $("error");
  el.textContent = error.message || String(error);
  el.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

/** Run one server action; its Face (if any) joins the list and is shown. */
async function act(what, promise, options = {}) {
  setBusy(+1);
  say(`${what}…`);
  try {
    const face = await promise();
    clearError();
    if (face) {
      addFace(face, options);
      show(face.id);
      say(`${face.label} — ${face.id}, ${Math.round(face.ms)} ms on the server`);
    }
    return face;
  } catch (e) {
    fail(e);
    say(`${what} failed`);
    return null;
  } finally {
    setBusy(-1);
  }
}

function addFace(raw, { replaces = null } = {}) {
  const face = {
    ...raw,
    vertices: decode(raw.vertices, Float32Array),
    errors: raw.errors ? decode(raw.errors, Float32Array) : null,
  };
  state.faces.set(face.id, face);
  // an interpolation slide keeps one list entry (its latest step) instead of one per slider tick
  const at = replaces ? state.order.indexOf(replaces) : -1;
  if (at >= 0) {
    state.order[at] = face.id;
    state.faces.delete(replaces);
    if (state.current === replaces) state.current = null;
  } else {
    state.order.push(face.id);
  }
  if (state.a === null) state.a = face.id;
  else if (state.b === null && state.a !== face.id) state.b = face.id;
  renderList();
  return face;
}

function show(id) {
  const face = state.faces.get(id);
  if (!face) return;
  state.current = id;
  const showErrors = $("error-map").checked;
  state.viewer.show(face.vertices, face.errors, showErrors);
  $("view3d").dataset.faceId = id;
  const img = $("geometry-image");
  img.src = face.image;
  img.alt = `geometry image of ${face.id}`;
  $("face-label").textContent = `${face.id}: ${face.label}`;
  $("face-fit").textContent = face.fit_error_mm == null ? "" : `fit error ${face.fit_error_mm.toFixed(2)} mm (mean)`;
  $("error-map").disabled = !face.errors;
  showLegend(face.errors && showErrors ? face.errors : null);
  for (const [kind, href] of [["obj", `/api/face/${id}.obj`], ["ply", `/api/face/${id}.ply`], ["codes", `/api/face/${id}/codes.json`]]) {
    const a = $(`download-${kind}`);
    a.href = href;
    a.setAttribute("download", kind === "codes" ? `${id}-codes.json` : `${id}.${kind}`);
    a.removeAttribute("aria-disabled");
  }
  renderList();
  for (const el of document.querySelectorAll("[data-needs-face]")) updateEnabled(el);
}

function showLegend(errors) {
  const legend = $("legend");
  legend.hidden = !errors;
  if (!errors) return;
  const top = errorScale(errors);
  $("legend-top").textContent = `≥ ${top.toFixed(2)} mm`;
  $("legend-mid").textContent = `${(top / 2).toFixed(2)} mm`;
  $("legend-bottom").textContent = "0 mm";
}

/** Buttons marked data-needs-face="current" / "ab" work once there is a face shown / faces A and B. */
function updateEnabled(el) {
  const need = el.dataset.needsFace;
  const ok = need === "ab" ? state.a !== null && state.b !== null && state.a !== state.b : state.current !== null;
  el.disabled = !ok;
}

function renderList() {
  const list = $("faces");
  list.replaceChildren();
  for (const id of [...state.order].reverse()) {
    const face = state.faces.get(id);
    const li = document.createElement("li");
    li.dataset.faceId = id;
    if (id === state.current) li.classList.add("current");
    const pick = (role) => {
      const label = document.createElement("label");
      label.className = `pick pick-${role}`;
      label.title = `use ${id} as face ${role.toUpperCase()}`;
      const input = document.createElement("input");
      input.type = "radio";
      input.name = `face-${role}`;
      input.value = id;
      input.checked = state[role] === id;
      input.addEventListener("change", () => {
        state[role] = id;
        renderList();
      });
      label.append(input, role.toUpperCase());
      return label;
    };
    const button = document.createElement("button");
    button.type = "button";
    button.className = "face-show";
    button.title = `show ${id}`;
    const fit = face.fit_error_mm == null ? "" : ` · ${face.fit_error_mm.toFixed(2)} mm`;
    button.innerHTML = `<span class="face-id"></span> <span class="face-text"></span>`;
    button.querySelector(".face-id").textContent = id;
    button.querySelector(".face-text").textContent = face.label + fit;
    button.addEventListener("click", () => show(id));
    li.append(pick("a"), pick("b"), button);
    list.append(li);
  }
  $("pick-a").textContent = state.a ?? "–";
  $("pick-b").textContent = state.b ?? "–";
  for (const el of document.querySelectorAll("[data-needs-face]")) updateEnabled(el);
}

// ---------------------------------------------------------------- actions

function random() {
  return act("drawing a random face", () => api("/api/random", {}));
}

function redraw(keep) {
  const face = state.current;
  return act(`keeping the ${keep} of ${face}`, () => api("/api/redraw", { face, keep }));
}

function transfer(mode) {
  const { a, b } = state;
  return act(`expression of ${a} onto ${b} (${mode})`, () =>
    api("/api/transfer", { target: b, source: a, mode, factor: "expression" }));
}

/** Slider: one request at a time; ticks arriving meanwhile collapse into the latest. */
function interpolate() {
  const job = { a: state.a, b: state.b, factor: $("interp-factor").value, t: Number($("interp-t").value) };
  $("interp-t-value").textContent = job.t.toFixed(2);
  state.interp.pending = job;
  if (!state.interp.running) runInterpolation();
}

async function runInterpolation() {
  const it = state.interp;
  it.running = true;
  while (it.pending) {
    const job = it.pending;
    it.pending = null;
    const key = `${job.a}|${job.b}|${job.factor}`;
    // replace the slide's previous step, unless the user kept it as A or B meanwhile
    const previous = it.key === key && state.faces.has(it.lastId) ? it.lastId : null;
    const replaces = previous !== state.a && previous !== state.b ? previous : null;
    const face = await act(`${job.a}→${job.b} in ${job.factor} space, t=${job.t.toFixed(2)}`,
      () => api("/api/interpolate", job), { replaces });
    if (face) Object.assign(it, { key, lastId: face.id });
  }
  it.running = false;
}

async function upload(file) {
  const limit = state.model.upload_limit_bytes;
  const status = $("upload-status");
  if (limit && file.size > limit) {
    const message = `${file.name}: ${(file.size / 1e6).toFixed(1)} MB, over the server's limit of ${(limit / 1e6).toFixed(1)} MB`;
    fail(new Error(message));
    status.textContent = "not uploaded";
    return;
  }
  status.textContent = `fitting ${file.name}…`;
  status.dataset.state = "fitting";
  const body = await file.arrayBuffer();
  const face = await act(`fitting ${file.name}`, () => api(`/api/upload?name=${encodeURIComponent(file.name)}`, body, true));
  if (face) {
    status.textContent = `fit error ${face.fit_error_mm.toFixed(2)} mm (mean)`;
    status.dataset.state = "done";
  } else {
    status.textContent = `${file.name}: not fitted (see the message below)`;
    status.dataset.state = "failed";
  }
}

// ---------------------------------------------------------------- start

async function start() {
  document.body.dataset.busy = "0";
  $("legend-bar").style.background = cssGradient();
  try {
    state.model = await api("/api/model");
  } catch (e) {
    fail(e);
    say("could not load the model");
    return;
  }
  const m = state.model;
  $("model-info").textContent =
    `${m.n_vertices.toLocaleString("en")} vertices · ${m.n_triangles.toLocaleString("en")} triangles · ` +
    m.factors.map((f, i) => `${f} code ${m.code_sizes[i]}`).join(" · ") + ` · noise ${m.noise_size} · ${m.resolution}×${m.resolution} px`;
  $("model-info").title = m.source;
  state.viewer = new Viewer($("view3d"), decode(m.triangles, Uint32Array), m.n_vertices);

  $("random").addEventListener("click", random);
  $("keep-identity").addEventListener("click", () => redraw("identity"));
  $("keep-expression").addEventListener("click", () => redraw("expression"));
  $("transfer-replace").addEventListener("click", () => transfer("replace"));
  $("transfer-add").addEventListener("click", () => transfer("add"));
  $("interp-t").addEventListener("input", interpolate);
  // at t = 0 the result is face A whatever the factor: no face to make until the slider moves
  $("interp-factor").addEventListener("change", () => Number($("interp-t").value) > 0 && interpolate());
  $("wireframe").addEventListener("change", (e) => state.viewer.setWireframe(e.target.checked));
  $("error-map").addEventListener("change", () => state.current && show(state.current));
  $("reset-view").addEventListener("click", () => state.viewer.resetView());
  $("upload").addEventListener("change", async (e) => {
    const file = e.target.files[0];
    if (file) await upload(file);
    e.target.value = ""; // the same file can be chosen again
  });
  renderList();
  say("ready: draw a random face or upload a registered mesh");
  document.body.dataset.ready = "1";
  await random();
}

start();
