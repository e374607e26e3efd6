// relaxlm chat: a page over the server's OpenAI API (/v1/models, /v1/chat/completions with
// streaming). Plain JavaScript, no dependencies, no build step. Conversations are kept in
// localStorage; the model's text is rendered by a small Markdown renderer that escapes all HTML
// first, so nothing the model writes can become markup.
"use strict";

const STORE_KEY = "relaxlm.conversations";
const SETTINGS_KEY = "relaxlm.settings";
const SETTING_IDS = ["system", "temperature", "top_p", "max_tokens", "seed", "api_key"];
const $ = (id) => document.getElementById(id);

const state = {
  conversations: loadJSON(STORE_KEY, []), // [{id, title, messages: [{role, content, ...}]}]
  current: null, // id of the conversation shown
  model: null, // id from /v1/models
  controller: null, // AbortController of the request in flight
  images: [], // data: URLs of the images attached to the next message
};

function loadJSON(key, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(key));
    return value ?? fallback;
  } catch {
    return fallback;
  }
}

function save() {
  try {
    localStorage.setItem(STORE_KEY, JSON.stringify(state.conversations));
  } catch {
    // Over the storage quota (images are large): keep the conversations without their images.
    const light = state.conversations.map((c) => ({
      ...c,
      messages: c.messages.map(({ images, ...m }) => (images ? { ...m, images: [] } : m)),
    }));
    localStorage.setItem(STORE_KEY, JSON.stringify(light));
  }
}

// -- Markdown ------------------------------------------------------------------------------------

function escapeHtml(text) {
  return text
    .replace(/&/g, "&amp;")
    .replace(/</g, "&lt;")
    .replace(/>/g, "&gt;")
    .replace(/"/g, "&quot;")
    .replace(/'/g, "&#39;");
}

// Inline rules over already-escaped text: code spans first (their content is left alone),
// then links (http(s) only), bold, italic.
function renderInline(escaped) {
  const spans = [];
  let text = escaped.replace(/`([^`\n]+)`/g, (_, code) => {
    spans.push(`<code>${code}</code>`);
    return `\u0000${spans.length - 1}\u0000`;
  });
  text = text
    .replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g,
      '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>')
    .replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^*\w])\*([^*\n]+)\*(?!\w)/g, "$1<em>$2</em>")
    .replace(/(^|[^_\w])_([^_\n]+)_(?!\w)/g, "$1<em>$2</em>");
  return text.replace(/\u0000(\d+)\u0000/g, (_, i) => spans[Number(i)]);
}

// Block rules: fenced code (an unclosed fence, as while streaming, runs to the end), headings,
// block quotes, lists and paragraphs.
function renderMarkdown(source) {
  const lines = source.replace(/\r\n?/g, "\n").split("\n");
  const out = [];
  let paragraph = [];
  let list = null; // {tag, items}
  const flushParagraph = () => {
    if (paragraph.length) out.push(`<p>${paragraph.map(renderInline).join("<br>")}</p>`);
    paragraph = [];
  };
  const flushList = () => {
    if (list) out.push(`<${list.tag}>${list.items.map((i) => `<li>${i}</li>`).join("")}</${list.tag}>`);
    list = null;
  };
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    const fence = line.match(/^\s*```\s*([\w+#.-]*)\s*$/);
    if (fence) {
      flushParagraph();
      flushList();
      const code = [];
      for (i++; i < lines.length && !/^\s*```\s*$/.test(lines[i]); i++) code.push(lines[i]);
      const lang = escapeHtml(fence[1] || "");
      const cls = lang ? ` class="language-${lang}"` : "";
      const label = lang ? `<span class="lang">${lang}</span>` : "";
      out.push(`<pre>${label}<code${cls}>${escapeHtml(code.join("\n"))}</code></pre>`);
      continue;
    }
    const escaped = escapeHtml(line);
    const heading = escaped.match(/^(#{1,6})\s+(.*)$/);
    const quote = escaped.match(/^&gt;\s?(.*)$/);
    const bullet = escaped.match(/^\s*[-*+]\s+(.*)$/);
    const numbered = escaped.match(/^\s*\d+[.)]\s+(.*)$/);
    if (heading) {
      flushParagraph();
      flushList();
      const level = Math.min(heading[1].length + 1, 6); // h1 is the page's
      out.push(`<h${level}>${renderInline(heading[2])}</h${level}>`);
    } else if (quote) {
      flushParagraph();
      flushList();
      out.push(`<blockquote>${renderInline(quote[1])}</blockquote>`);
    } else if (bullet || numbered) {
      flushParagraph();
      const tag = bullet ? "ul" : "ol";
      if (list && list.tag !== tag) flushList();
      list = list || { tag, items: [] };
      list.items.push(renderInline((bullet || numbered)[1]));
    } else if (!line.trim()) {
      flushParagraph();
      flushList();
    } else {
      flushList();
      paragraph.push(escaped);
    }
  }
  flushParagraph();
  flushList();
  return out.join("");
}

// -- rendering -------------------------------------------------------------------------------------

function conversation() {
  return state.conversations.find((c) => c.id === state.current);
}

function renderHistory() {
  const ul = $("history");
  ul.replaceChildren();
  for (const conv of [...state.conversations].reverse()) {
    const li = document.createElement("li");
    li.textContent = conv.title || "New chat";
    li.title = li.textContent;
    li.dataset.id = conv.id;
    if (conv.id === state.current) li.classList.add("active");
    li.addEventListener("click", () => {
      if (state.controller) return; // finish or stop the answer first
      state.current = conv.id;
      renderHistory();
      renderMessages();
    });
    ul.append(li);
  }
}

function messageElement(message) {
  const div = document.createElement("div");
  div.className = `msg ${message.role}`;
  const role = document.createElement("div");
  role.className = "role";
  role.textContent = message.role;
  const body = document.createElement("div");
  body.className = "body";
  div.append(role, body);
  for (const event of message.events || []) div.insertBefore(toolEventElement(event), body);
  fillBody(div, message);
  return div;
}

function fillBody(div, message) {
  const body = div.querySelector(".body");
  if (message.role === "user") {
    body.textContent = message.content;
    for (const url of message.images || []) body.append(thumbnail(url));
  } else body.innerHTML = renderMarkdown(message.content || "");
  let meta = div.querySelector(".meta");
  if (message.meta) {
    if (!meta) {
      meta = document.createElement("div");
      meta.className = "meta";
      div.append(meta);
    }
    meta.textContent = message.meta;
  }
}

function thumbnail(url) {
  const img = document.createElement("img");
  img.className = "thumb";
  img.alt = "attached image";
  img.src = url; // a data: URL read from the user's own file
  return img;
}

function renderAttachments() {
  $("attachments").replaceChildren(...state.images.map(thumbnail));
}

// OpenAI content parts: the images, then the text.
function apiContent(message) {
  if (!message.images?.length) return message.content;
  const images = message.images.map((url) => ({ type: "image_url", image_url: { url } }));
  return [...images, { type: "text", text: message.content }];
}

function toolEventElement(event) {
  const div = document.createElement("div");
  div.className = "tool-event";
  if (event.type === "tool_call") {
    div.textContent = `→ ${event.tool}(${event.arguments ?? ""})`;
  } else if (event.type === "tool_result") {
    div.textContent = `← ${event.tool}: ${event.result}`;
    if (event.is_error) div.classList.add("failed");
  } else {
    div.textContent = `⚠ ${event.message}`;
    div.classList.add("failed");
  }
  return div;
}

function renderMessages() {
  const box = $("messages");
  box.replaceChildren();
  const conv = conversation();
  for (const message of conv ? conv.messages : []) box.append(messageElement(message));
  box.scrollTop = box.scrollHeight;
}

function setStatus(text) {
  $("status").textContent = text;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

// -- the API ---------------------------------------------------------------------------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function loadModel() {
  const fields = $("model-fields");
  try {
    const response = await fetch("../v1/models", { headers: headers() });
    if (!response.ok) throw new Error(await errorText(response));
    const models = (await response.json()).data || [];
    if (!models.length) throw new Error("the server lists no model");
    state.model = models[0].id;
    fields.replaceChildren();
    for (const [key, value] of Object.entries(models[0])) {
      if (value === null || typeof value === "object") continue;
      const dt = document.createElement("dt");
      dt.textContent = key;
      const dd = document.createElement("dd");
      dd.textContent = key === "created" ? new Date(value * 1000).toLocaleString() : String(value);
      fields.append(dt, dd);
    }
  } catch (e) {
    fields.innerHTML = "<dt>error</dt><dd></dd>";
    fields.querySelector("dd").textContent = e.message;
  }
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error?.message || body.detail || JSON.stringify(body);
  } catch {
    return `HTTP ${response.status} ${response.statusText}`;
  }
}

function requestBody(messages) {
  const body = {
    model: state.model,
    messages,
    stream: true,
    stream_options: { include_usage: true },
  };
  for (const id of ["temperature", "top_p"]) {
    const value = parseFloat($(id).value);
    if (!Number.isNaN(value)) body[id] = value;
  }
  for (const id of ["max_tokens", "seed"]) {
    const value = parseInt($(id).value, 10);
    if (!Number.isNaN(value)) body[id] = value;
  }
  return body;
}

// Server-sent events: `data: {json}` records separated by a blank line, `data: [DONE]` last.
async function* sseRecords(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const record = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = record
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

async function send(text, images = []) {
  let conv = conversation();
  if (!conv) {
    conv = { id: crypto.randomUUID ? crypto.randomUUID() : String(Date.now()), title: "", messages: [] };
    state.conversations.push(conv);
    state.current = conv.id;
  }
  if (!conv.title) conv.title = text.slice(0, 60);
  conv.messages.push(images.length ? { role: "user", content: text, images } : { role: "user", content: text });
  const reply = { role: "assistant", content: "", events: [] };
  conv.messages.push(reply);
  save();
  renderHistory();
  renderMessages();

  const box = $("messages");
  const div = box.lastElementChild;
  div.classList.add("streaming");
  const system = $("system").value.trim();
  const history = conv.messages
    .slice(0, -1)
    .filter((m) => !m.error)
    .map((m) => ({ role: m.role, content: apiContent(m) }));
  const messages = system ? [{ role: "system", content: system }, ...history] : history;

  state.controller = new AbortController();
  setBusy(true);
  setStatus("waiting for the first token…");
  const started = performance.now();
  let firstToken = null;
  let deltas = 0; // content deltas: the token count until usage arrives (or after a stop)
  let usage = null;
  let finish = null;
  let pending = false;
  const repaint = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      fillBody(div, reply);
      box.scrollTop = box.scrollHeight;
    });
  };
  try {
    const response = await fetch("../v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(requestBody(messages)),
      signal: state.controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    setStatus("streaming…");
    for await (const chunk of sseRecords(response)) {
      if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
      if (chunk.usage) usage = chunk.usage;
      if (chunk.mcp_event) {
        reply.events.push(chunk.mcp_event);
        div.insertBefore(toolEventElement(chunk.mcp_event), div.querySelector(".body"));
      }
      const choice = (chunk.choices || [])[0];
      if (!choice) continue;
      const delta = choice.delta || {};
      if (delta.content) {
        if (firstToken === null) firstToken = performance.now();
        deltas += 1;
        reply.content += delta.content;
        repaint();
      }
      for (const call of delta.tool_calls || []) {
        if (call.function?.name) reply.content += `\n\`tool call: ${call.function.name}\` `;
        if (call.function?.arguments) reply.content += call.function.arguments;
        repaint();
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    reply.meta = summary(started, firstToken, usage ?? { completion_tokens: deltas }, finish);
  } catch (e) {
    if (e.name === "AbortError") {
      reply.meta = `stopped · ${summary(started, firstToken, { completion_tokens: deltas }, null)}`;
    } else {
      reply.error = true;
      reply.content += `${reply.content ? "\n\n" : ""}**Error:** ${e.message}`;
      div.classList.add("error");
    }
  } finally {
    state.controller = null;
    div.classList.remove("streaming");
    fillBody(div, reply);
    save();
    setBusy(false);
    setStatus(reply.meta || "");
    box.scrollTop = box.scrollHeight;
  }
}

function summary(started, firstToken, usage, finish) {
  const parts = [];
  if (firstToken !== null) parts.push(`first token ${((firstToken - started) / 1000).toFixed(2)} s`);
  if (usage) {
    const seconds = (performance.now() - (firstToken ?? started)) / 1000;
    parts.push(`${usage.completion_tokens} tokens`);
    if (seconds > 0) parts.push(`${(usage.completion_tokens / seconds).toFixed(1)} tok/s`);
  }
  if (finish) parts.push(`finish: ${finish}`);
  return parts.join(" · ");
}

// -- wiring ----------------------------------------------------------------------------------------

function restoreSettings() {
  const saved = loadJSON(SETTINGS_KEY, {});
  for (const id of SETTING_IDS) {
    if (saved[id] !== undefined) $(id).value = saved[id];
    $(id).addEventListener("change", () => {
      const now = loadJSON(SETTINGS_KEY, {});
      now[id] = $(id).value;
      localStorage.setItem(SETTINGS_KEY, JSON.stringify(now));
      if (id === "api_key") loadModel();
    });
  }
}

function submit() {
  const text = $("input").value.trim();
  if ((!text && !state.images.length) || state.controller) return;
  $("input").value = "";
  const images = state.images;
  state.images = [];
  renderAttachments();
  send(text, images);
}

function readDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  submit();
});
$("input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    submit();
  }
});
$("settings-form").addEventListener("submit", (e) => e.preventDefault());
$("image-input").addEventListener("change", async (e) => {
  const files = [...e.target.files];
  e.target.value = ""; // the same file may be attached again
  try {
    state.images.push(...(await Promise.all(files.map(readDataURL))));
  } catch (error) {
    setStatus(`could not read the image: ${error}`);
  }
  renderAttachments();
});
$("stop").addEventListener("click", () => state.controller?.abort());
$("new-chat").addEventListener("click", () => {
  if (state.controller) return;
  state.current = null;
  renderHistory();
  renderMessages();
  $("input").focus();
});

restoreSettings();
state.current = state.conversations.length ? state.conversations.at(-1).id : null;
renderHistory();
renderMessages();
loadModel();
