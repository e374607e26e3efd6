// relaxlm images: a page over the image server's API (/v1/models, /v1/images/generations).
// Each request's images are shown newest first with the prompt and seed that made them, so a
// seed can be read off and reused; nothing is stored.
"use strict";

const $ = (id) => document.getElementById(id);
let model = null;

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error?.message || body.detail || JSON.stringify(body);
  } catch {
    return `HTTP ${response.status} ${response.statusText}`;
  }
}

async function loadModel() {
  const fields = $("model-fields");
  try {
    const response = await fetch("../v1/models");
    if (!response.ok) throw new Error(await errorText(response));
    const card = (await response.json()).data[0];
    model = card.id;
    $("n").max = card.max_n;
    fields.replaceChildren();
    for (const key of ["id", "task", "size", "max_n"]) {
      const dt = document.createElement("dt");
      dt.textContent = key;
      const dd = document.createElement("dd");
      dd.textContent = String(card[key]);
      fields.append(dt, dd);
    }
  } catch (e) {
    fields.innerHTML = "<dt>error</dt><dd></dd>";
    fields.querySelector("dd").textContent = e.message;
  }
}

function number(id) {
  const value = $(id).value.trim();
  return value === "" ? null : Number(value);
}

function showResult(prompt, seed, images, seconds) {
  const figure = document.createElement("figure");
  figure.className = "generation";
  for (const [i, item] of images.entries()) {
    const img = document.createElement("img");
    img.src = `data:image/png;base64,${item.b64_json}`;
    img.alt = `${prompt} (seed ${seed + i})`;
    img.title = `seed ${seed + i}`;
    figure.append(img);
  }
  const caption = document.createElement("figcaption");
  caption.textContent = `${prompt} · seed ${seed} · ${seconds.toFixed(1)} s`;
  figure.append(caption);
  $("gallery").prepend(figure);
}

async function generate() {
  const prompt = $("input").value.trim();
  if (!prompt || !model) return;
  const seed = number("seed") ?? Math.floor(Math.random() * 2 ** 31);
  const body = {
    model,
    prompt,
    n: number("n") ?? 1,
    steps: number("steps") ?? 25,
    guidance_scale: number("guidance_scale"), // null: the pipeline's (SD 7.5, FLUX 3.5)
    negative_prompt: $("negative_prompt").value,
    seed,
    response_format: "b64_json",
  };
  $("send").disabled = true;
  setStatus(`generating ${body.n} image(s) in ${body.steps} steps…`);
  const started = performance.now();
  try {
    const response = await fetch("../v1/images/generations", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    if (!response.ok) throw new Error(await errorText(response));
    const result = await response.json();
    const seconds = (performance.now() - started) / 1000;
    showResult(prompt, seed, result.data, seconds);
    const cut = response.headers.get("x-relaxlm-prompt-truncated") === "true";
    setStatus(`done in ${seconds.toFixed(1)} s` + (cut ? " (the prompt was cut to fit)" : ""));
  } catch (e) {
    setStatus(e.message, true);
  } finally {
    $("send").disabled = false;
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  generate();
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    generate();
  }
});
loadModel();
