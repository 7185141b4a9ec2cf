// The chat page: talks only to this daemon (/info, /v1/models, /v1/chat/completions with stream).
// No framework and no build step; marked and DOMPurify are vendored beside this file.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = "chatglm-serve.api-key"; // sessionStorage: the API key, for this tab only
  const CURRENT_STORE = "chatglm-serve.current"; // sessionStorage: this tab's open conversation
  const CHAT_PREFIX = "chatglm-serve.chat."; // localStorage: one entry per conversation
  const SETTINGS_STORE = "chatglm-serve.settings"; // localStorage: the Settings panel
  const SETTING_IDS = ["system-prompt", "max-tokens", "top-p", "temperature"];

  const state = {
    conv: null, // the open conversation: {id, title, named, created, updated, messages}
    model: null, // the served name from /v1/models (kept so strict model-name mode works)
    controller: null, // AbortController of the reply being streamed
    stopped: false,
    locked: false, // the server wants a key we do not have: input and Send are off
    pending: null, // {text, baseLength} to send once an API key has been given
    epoch: 0, // bumped when another conversation is shown, so a late reply does not draw into it
    deleted: new Set(), // ids deleted while a reply for them may still be streaming
  };

  // --- storage: conversations in localStorage (one key each, so two tabs rarely collide) --------

  // Storage may be switched off (privacy settings) or full; the page then works without it.
  const local = (() => {
    try {
      window.localStorage.getItem(CHAT_PREFIX);
      return window.localStorage;
    } catch {
      return null;
    }
  })();

  function readJSON(key) {
    try {
      return JSON.parse(local.getItem(key));
    } catch {
      return null;
    }
  }

  function isConversation(c) {
    return (
      c !== null &&
      typeof c === "object" &&
      typeof c.id === "string" &&
      Array.isArray(c.messages) &&
      c.messages.every((m) => m && (m.role === "user" || m.role === "assistant") && typeof m.content === "string")
    );
  }

  function loadConversation(id) {
    if (!local || !id) return null;
    const c = readJSON(CHAT_PREFIX + id);
    return isConversation(c) ? c : null;
  }

  function listConversations() {
    if (!local) return [];
    const all = [];
    for (let i = 0; i < local.length; i += 1) {
      const key = local.key(i);
      if (key && key.startsWith(CHAT_PREFIX)) {
        const c = readJSON(key);
        if (isConversation(c)) all.push(c);
      }
    }
    return all.sort((a, b) => (b.updated || 0) - (a.updated || 0));
  }

  // touch: a new turn moves it to the top of the list (a rename does not)
  function saveConversation(c, touch = true) {
    if (state.deleted.has(c.id)) return;
    if (touch) c.updated = Date.now();
    if (local) {
      try {
        local.setItem(CHAT_PREFIX + c.id, JSON.stringify(c));
      } catch {
        addError("The browser's storage is full: this conversation is not saved. Delete old ones to make room.");
      }
    }
    renderList();
  }

  function newConversation() {
    const id = `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 8)}`;
    return { id, title: "", named: false, created: Date.now(), updated: Date.now(), messages: [] };
  }

  const titleOf = (c) => c.title || "New chat";

  function titleFrom(text) {
    const line = text.trim().split("\n")[0].trim();
    return line.length > 60 ? `${line.slice(0, 57)}…` : line;
  }

  // --- the conversation list ----------------------------------------------------------------------

  function button(label, className, extra = {}) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = className;
    b.textContent = label;
    for (const [k, v] of Object.entries(extra)) b.setAttribute(k, v);
    return b;
  }

  function renderList() {
    const list = $("conversations");
    const all = listConversations();
    const rows = all.map((c) => {
      const li = document.createElement("li");
      li.className = "conv";
      li.dataset.id = c.id;
      if (state.conv && c.id === state.conv.id) {
        li.classList.add("active");
        li.setAttribute("aria-current", "true");
      }
      const open = button(titleOf(c), "conv-title", { "data-conv-action": "open", title: titleOf(c) });
      const rename = button("Rename", "conv-rename plain small", { "data-conv-action": "rename" });
      const del = button("Delete", "conv-delete plain small", { "data-conv-action": "delete" });
      li.append(open, rename, del);
      return li;
    });
    list.replaceChildren(...rows);
    $("no-conversations").hidden = all.length > 0;
  }

  function openConversation(c) {
    if (state.controller) stop(); // the stopped reply is filed into its own conversation
    state.conv = c;
    state.pending = null;
    state.epoch += 1;
    try {
      sessionStorage.setItem(CURRENT_STORE, c.id);
    } catch {
      // without sessionStorage a reload opens a new chat, nothing worse
    }
    renderLog(c.messages);
    const last = c.messages[c.messages.length - 1];
    $("stats").textContent = last && last.role === "assistant" && last.meta ? metaLine(last.meta) : "";
    renderList();
    closeSidebar();
  }

  function startNewChat() {
    openConversation(newConversation());
    $("input").focus();
  }

  function renameRow(li) {
    const c = loadConversation(li.dataset.id);
    if (!c) return;
    const input = document.createElement("input");
    input.className = "conv-rename-input";
    input.value = titleOf(c);
    input.setAttribute("aria-label", "Conversation name");
    let done = false;
    const finish = (keep) => {
      if (done) return;
      done = true;
      const name = input.value.trim();
      if (keep && name) {
        // the open conversation object is the one later turns are saved from: rename it too
        const target = state.conv && state.conv.id === c.id ? state.conv : c;
        target.title = name;
        target.named = true;
        saveConversation(target, false);
      } else {
        renderList();
      }
    };
    input.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.isComposing) {
        e.preventDefault();
        finish(true);
      } else if (e.key === "Escape") {
        finish(false);
      }
    });
    input.addEventListener("blur", () => finish(true));
    li.replaceChildren(input);
    input.focus();
    input.select();
  }

  function confirmDelete(li) {
    const c = loadConversation(li.dataset.id);
    if (!c) return;
    const question = document.createElement("span");
    question.className = "conv-question";
    question.textContent = `Delete “${titleOf(c)}”?`;
    const yes = button("Delete", "conv-confirm danger small", { "data-conv-action": "confirm-delete" });
    const no = button("Keep", "conv-keep plain small", { "data-conv-action": "keep" });
    li.classList.add("confirming");
    li.replaceChildren(question, yes, no);
    no.focus();
  }

  function deleteConversation(id) {
    if (state.conv && state.conv.id === id && state.controller) stop();
    state.deleted.add(id);
    if (local) local.removeItem(CHAT_PREFIX + id);
    if (state.conv && state.conv.id === id) {
      const next = listConversations()[0];
      openConversation(next || newConversation());
    } else {
      renderList();
    }
  }

  $("conversations").addEventListener("click", (e) => {
    const target = e.target.closest("[data-conv-action]");
    if (!target) return;
    const li = target.closest("li.conv");
    const action = target.dataset.convAction;
    if (action === "open") {
      const c = loadConversation(li.dataset.id);
      if (c && !(state.conv && state.conv.id === c.id)) openConversation(c);
      else closeSidebar();
    } else if (action === "rename") renameRow(li);
    else if (action === "delete") confirmDelete(li);
    else if (action === "confirm-delete") deleteConversation(li.dataset.id);
    else if (action === "keep") renderList();
  });

  // Phone width: the list is a drawer over the page.
  function openSidebar() {
    document.body.classList.add("sidebar-open");
    $("scrim").hidden = false;
    $("open-sidebar").setAttribute("aria-expanded", "true");
  }

  function closeSidebar() {
    document.body.classList.remove("sidebar-open");
    $("scrim").hidden = true;
    $("open-sidebar").setAttribute("aria-expanded", "false");
  }

  // --- API key: asked for once, kept for this tab's session -------------------------------------

  const apiKey = () => sessionStorage.getItem(KEY_STORE) || "";

  function requestHeaders() {
    const h = { "Content-Type": "application/json" };
    const key = apiKey();
    if (key) h.Authorization = `Bearer ${key}`;
    return h;
  }

  function setLocked(locked) {
    state.locked = locked;
    $("input").disabled = locked;
    $("input").placeholder = locked ? "Enter the API key above to start chatting" : "Type a message…";
    setBusy(state.controller !== null);
  }

  function askForKey() {
    const hadKey = apiKey() !== "";
    if (hadKey) sessionStorage.removeItem(KEY_STORE);
    $("key-message").textContent = hadKey
      ? "The server did not accept that key. Check it for typos (keys are case-sensitive) and enter it again."
      : "This server is protected by an API key. Enter the key to start chatting.";
    $("key-form").classList.toggle("refused", hadKey);
    $("key-form").hidden = false;
    setLocked(true);
    $("api-key").value = "";
    $("api-key").focus();
  }

  function unlock() {
    const wasLocked = state.locked;
    $("key-form").hidden = true;
    setLocked(false);
    if (wasLocked) $("input").focus();
  }

  async function probeServer() {
    let res;
    try {
      res = await fetch("v1/models", { headers: requestHeaders() });
    } catch {
      return; // the first chat request will report an unreachable server
    }
    if (res.status === 401) {
      askForKey();
      return;
    }
    if (!res.ok) return;
    unlock();
    try {
      const body = await res.json();
      const first = body && Array.isArray(body.data) && body.data[0];
      if (first && typeof first.id === "string") {
        state.model = first.id;
        $("model-name").textContent = first.id;
      }
    } catch {
      // a models list we cannot read only costs us the name in the header
    }
  }

  // Public and needs no key: the served name, and whether this is the embedded demo model.
  async function loadInfo() {
    try {
      const res = await fetch("info");
      if (!res.ok) return;
      const info = await res.json();
      $("demo-banner").hidden = !(info && info.demo === true);
      if (info && typeof info.model === "string" && !$("model-name").textContent) {
        $("model-name").textContent = info.model;
      }
    } catch {
      // an older daemon without /info: no banner
    }
  }

  // --- rendering -----------------------------------------------------------------------------

  // Markdown via marked, then DOMPurify; raw HTML written by the model is shown as text (never
  // parsed as markup), and the sanitizer returns DOM nodes, so no HTML string is assigned anywhere.
  const escapeHtml = (s) =>
    String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

  const markdown = (() => {
    if (!window.marked || !window.DOMPurify || !window.DOMPurify.isSupported) return null;
    const parser = new window.marked.Marked({ gfm: true, breaks: true, async: false });
    parser.use({
      renderer: {
        html(token) {
          const text = escapeHtml(token.text);
          return token.block ? `<p>${text}</p>` : text;
        },
        // no images from model text (they would load from wherever it points): a link instead
        image(token) {
          return `<a href="${escapeHtml(token.href)}">${escapeHtml(token.text || token.href)}</a>`;
        },
      },
    });
    const purify = window.DOMPurify;
    purify.addHook("afterSanitizeAttributes", (node) => {
      if (node.tagName === "A" && node.hasAttribute("href")) {
        node.setAttribute("target", "_blank");
        node.setAttribute("rel", "noopener noreferrer nofollow");
      }
    });
    const config = {
      FORBID_TAGS: ["img", "style", "form", "input", "button", "textarea", "select", "svg", "math", "iframe"],
      FORBID_ATTR: ["style"],
      RETURN_DOM_FRAGMENT: true,
    };
    return (text) => purify.sanitize(parser.parse(text), config);
  })();

  // Code blocks get a header (language, Copy); wide tables scroll instead of widening the page.
  function decorate(fragment) {
    for (const pre of fragment.querySelectorAll("pre")) {
      const code = pre.querySelector("code");
      const match = code && /(?:^|\s)language-([\w+#.-]+)/.exec(code.className);
      const lang = match ? match[1] : "";
      if (code) {
        if (lang) code.dataset.lang = lang;
        const last = code.lastChild;
        if (last && last.nodeType === Node.TEXT_NODE && last.data.endsWith("\n")) last.data = last.data.slice(0, -1);
      }
      const box = document.createElement("div");
      box.className = "code-block";
      const head = document.createElement("div");
      head.className = "code-head";
      const label = document.createElement("span");
      label.textContent = lang || "code";
      head.append(label, button("Copy", "copy-code plain small", { "aria-label": "Copy code" }));
      pre.replaceWith(box);
      box.append(head, pre);
    }
    for (const table of fragment.querySelectorAll("table")) {
      const wrap = document.createElement("div");
      wrap.className = "table-wrap";
      table.replaceWith(wrap);
      wrap.append(table);
    }
    return fragment;
  }

  function renderReply(el, text) {
    if (markdown) {
      el.replaceChildren(decorate(markdown(text)));
    } else {
      el.classList.add("plain-text"); // the libraries did not load: text as it came
      el.textContent = text;
    }
  }

  function nearBottom() {
    const log = $("log");
    return log.scrollHeight - log.scrollTop - log.clientHeight < 80;
  }

  function scrollDown(force) {
    if (force || nearBottom()) $("log").scrollTop = $("log").scrollHeight;
  }

  function updateHint() {
    $("empty-hint").hidden = $("log").querySelector(".msg") !== null;
  }

  // One message in the log. `index` is its place in the conversation (absent while it streams or
  // when it is not part of the conversation: a failed or dropped turn).
  function addMessage(role, text, index, meta) {
    const wrap = document.createElement("div");
    wrap.className = `msg ${role}`;
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = role === "user" ? "You" : "ChatGLM";
    const content = document.createElement("div");
    content.className = role === "user" ? "content" : "content markdown";
    const metaEl = document.createElement("div");
    metaEl.className = "meta";
    const actions = document.createElement("div");
    actions.className = "actions";
    if (role === "user") {
      actions.append(button("Edit", "plain small", { "data-action": "edit" }));
    } else {
      actions.append(
        button("Copy", "plain small", { "data-action": "copy" }),
        button("Regenerate", "plain small", { "data-action": "regenerate" }),
      );
    }
    wrap.append(who, content, metaEl, actions);
    setText(wrap, role, text);
    if (index !== undefined) wrap.dataset.index = String(index);
    if (meta) renderMeta(metaEl, meta);
    $("log").append(wrap);
    updateHint();
    scrollDown(true);
    return { wrap, content, meta: metaEl };
  }

  function setText(wrap, role, text) {
    wrap.dataset.raw = text; // the text as written: what Copy copies and Edit starts from
    const content = wrap.querySelector(".content");
    if (role === "user") content.textContent = text;
    else renderReply(content, text);
  }

  // meta: {stats, finish} as stored with a reply; finish says why it ended.
  function renderMeta(el, meta) {
    const parts = [];
    if (meta.stats) {
      const s = document.createElement("span");
      s.className = "stats";
      s.textContent = meta.stats;
      parts.push(s);
    }
    const why = finishText(meta.finish);
    if (why) {
      if (parts.length) parts.push(document.createTextNode(" · "));
      const f = document.createElement("span");
      f.className = `finish finish-${meta.finish}`;
      f.textContent = why;
      if (meta.finish === "length") {
        f.title = "The reply reached Max tokens (Settings) or the end of the model's context window.";
      }
      parts.push(f);
    }
    el.replaceChildren(...parts);
  }

  function finishText(reason) {
    if (!reason) return "";
    if (reason === "stop") return "complete";
    if (reason === "length") return "cut off: length limit reached";
    if (reason === "stopped") return "stopped by you";
    return `ended: ${reason}`;
  }

  function metaLine(meta) {
    const why = finishText(meta.finish);
    return [meta.stats, why].filter(Boolean).join(" · ");
  }

  function renderLog(messages) {
    for (const el of $("log").querySelectorAll(".msg")) el.remove();
    messages.forEach((m, i) => addMessage(m.role, m.content, i, m.role === "assistant" ? m.meta : null));
    updateHint();
    updateActions();
    scrollDown(true);
  }

  // Errors are the page's, not the model's: their own block, not under the model's name.
  function addError(text) {
    const wrap = document.createElement("div");
    wrap.className = "msg error";
    wrap.setAttribute("role", "alert");
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = "Error";
    const body = document.createElement("div");
    body.className = "error-text";
    body.textContent = text;
    wrap.append(who, body);
    $("log").append(wrap);
    updateHint();
    scrollDown(true);
  }

  function updateActions() {
    const busy = state.controller !== null;
    const count = state.conv ? state.conv.messages.length : 0;
    for (const b of $("log").querySelectorAll(".msg [data-action]")) {
      const msg = b.closest(".msg");
      b.disabled = (busy || state.locked) && b.dataset.action !== "copy";
      if (b.dataset.action === "regenerate") {
        // only the last reply of the conversation can be asked for again
        b.hidden = msg.dataset.index !== String(count - 1);
      }
    }
  }

  // --- talking to the server ---------------------------------------------------------------------

  async function errorMessage(res) {
    let text = "";
    try {
      text = await res.text();
      const body = JSON.parse(text);
      if (body && body.error && body.error.message) return body.error.message;
      if (body && body.detail) return String(body.detail);
    } catch {
      // not JSON: show the start of whatever came
    }
    return text.slice(0, 300) || res.statusText;
  }

  // Server-sent events from a fetch body: yields each event's data (data: lines joined).
  async function* sseData(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    let data = [];
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value;
      let nl = buf.indexOf("\n");
      while (nl >= 0) {
        let line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        if (line.endsWith("\r")) line = line.slice(0, -1);
        if (line === "") {
          if (data.length) yield data.join("\n");
          data = [];
        } else if (line.startsWith("data:")) {
          data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
        } // comments (": ping") and other fields carry nothing for us
        nl = buf.indexOf("\n");
      }
    }
    if (data.length) yield data.join("\n");
  }

  function numberField(id, parse) {
    const v = parse($(id).value);
    return Number.isFinite(v) ? v : undefined;
  }

  function buildRequest(base, text) {
    const messages = [];
    const system = $("system-prompt").value.trim();
    if (system) messages.push({ role: "system", content: system });
    for (const m of base) messages.push({ role: m.role, content: m.content });
    messages.push({ role: "user", content: text });
    const body = {
      messages,
      stream: true,
      stream_options: { include_usage: true },
      max_tokens: numberField("max-tokens", (s) => parseInt(s, 10)),
      top_p: numberField("top-p", parseFloat),
      temperature: numberField("temperature", parseFloat),
    };
    if (state.model) body.model = state.model;
    return body;
  }

  function setBusy(busy) {
    $("send").disabled = busy || state.locked;
    $("stop").disabled = !busy;
    document.body.classList.toggle("busy", busy);
    updateActions();
  }

  function formatStats(tokens, exact, tStart, tFirst, tEnd) {
    // tokens/s over the generation (after the first token), as llama.cpp's page reports it
    const gen = tFirst !== null ? (tEnd - tFirst) / 1000 : 0;
    const rate = tokens > 1 && gen > 0 ? (tokens - 1) / gen : tokens / Math.max((tEnd - tStart) / 1000, 1e-3);
    const parts = [`${exact ? "" : "≈"}${tokens} token${tokens === 1 ? "" : "s"}`, `${rate.toFixed(1)} tokens/s`];
    if (tFirst !== null) parts.push(`first token after ${((tFirst - tStart) / 1000).toFixed(2)} s`);
    return parts.join(" · ");
  }

  // Send `text` as the next user turn after the conversation's first `baseLength` messages (all
  // of them for a new message; fewer to regenerate a reply or to resend an edited message). The
  // conversation changes only when a reply comes: a failed turn leaves it as it was.
  async function send(text, baseLength) {
    if (state.controller || state.locked) return;
    const conv = state.conv;
    const base = conv.messages.slice(0, baseLength === undefined ? conv.messages.length : baseLength);
    const truncated = base.length !== conv.messages.length;
    if (truncated) renderLog(base);
    const body = buildRequest(base, text);
    let user = addMessage("user", text);
    let reply = addMessage("assistant", "");
    reply.wrap.classList.add("streaming");
    const controller = new AbortController();
    const epoch = state.epoch;
    state.controller = controller;
    state.stopped = false;
    setBusy(true);

    let answer = "";
    let usage = null;
    let chunks = 0;
    let finish = null;
    let failure = null;
    let rendering = false;
    const tStart = performance.now();
    let tFirst = null;
    const render = () => {
      if (rendering) return;
      rendering = true;
      requestAnimationFrame(() => {
        rendering = false;
        if (epoch !== state.epoch) return;
        const follow = nearBottom();
        setText(reply.wrap, "assistant", answer);
        scrollDown(follow);
      });
    };

    const keyUsed = sessionStorage.getItem(KEY_STORE);
    let resend = null;
    let handedOff = false; // refused for want of a key: sent again later, nothing to show now
    try {
      const res = await fetch("v1/chat/completions", {
        method: "POST",
        headers: requestHeaders(),
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (res.status === 401) {
        handedOff = true;
        // nothing was generated: take the turn back and send it again once we have a key
        if (epoch === state.epoch) renderLog(conv.messages);
        const keyNow = sessionStorage.getItem(KEY_STORE);
        if (keyNow && keyNow !== keyUsed) {
          resend = { text, baseLength: base.length }; // a key was given meanwhile: use it
          return;
        }
        state.pending = { text, baseLength: base.length };
        askForKey();
        return;
      }
      if (!res.ok) {
        const retry = res.headers.get("Retry-After");
        failure = `Error ${res.status}: ${await errorMessage(res)}${retry ? ` (retry after ${retry} s)` : ""}`;
      } else {
        for await (const data of sseData(res.body)) {
          if (data === "[DONE]") break;
          let event;
          try {
            event = JSON.parse(data);
          } catch {
            failure = `Unreadable event from the server: ${data.slice(0, 200)}`;
            break;
          }
          if (event.error) {
            failure = `Error: ${event.error.message || JSON.stringify(event.error)}`;
            break;
          }
          if (event.usage) usage = event.usage;
          const choice = Array.isArray(event.choices) ? event.choices[0] : null;
          if (choice && choice.finish_reason) finish = choice.finish_reason;
          const delta = choice && choice.delta && choice.delta.content;
          if (delta) {
            if (tFirst === null) tFirst = performance.now();
            chunks += 1;
            answer += delta;
            render();
          }
        }
      }
    } catch (e) {
      if (!(e && e.name === "AbortError")) failure = `Cannot reach the server: ${e && e.message ? e.message : e}`;
    } finally {
      if (state.controller === controller) state.controller = null;
      setBusy(false);
      if (resend) setTimeout(() => send(resend.text, resend.baseLength), 0);
    }
    if (handedOff) return;

    const shown = epoch === state.epoch; // false once another conversation was opened
    const tEnd = performance.now();
    if (failure || (state.stopped && !answer)) {
      // not part of the conversation: shown faded after it, the text given back for another try
      if (!shown) return;
      if (truncated) {
        renderLog(conv.messages);
        user = addMessage("user", text);
        reply = answer || !failure ? addMessage("assistant", answer) : null;
      } else if (!answer && failure) {
        reply.wrap.remove();
        reply = null;
      }
      user.wrap.classList.add("dropped");
      if (reply) {
        reply.wrap.classList.remove("streaming");
        reply.wrap.classList.add("dropped");
        setText(reply.wrap, "assistant", answer);
      }
      if (failure) {
        addError(failure);
        if (!$("input").value) $("input").value = text;
      } else {
        reply.meta.textContent = "stopped before any reply";
      }
      updateActions();
      return;
    }
    // Like the seed's demo, a stopped reply stays in the conversation as far as it got.
    const tokens = usage ? usage.completion_tokens : chunks;
    const stats = formatStats(tokens, Boolean(usage), tStart, tFirst, tEnd);
    const meta = { stats, finish: state.stopped ? "stopped" : finish };
    conv.messages = base.concat([
      { role: "user", content: text },
      { role: "assistant", content: answer, meta },
    ]);
    if (!conv.named && base.length === 0) conv.title = titleFrom(text);
    saveConversation(conv);
    if (!shown) return;
    const follow = nearBottom();
    reply.wrap.classList.remove("streaming");
    setText(reply.wrap, "assistant", answer);
    user.wrap.dataset.index = String(base.length);
    reply.wrap.dataset.index = String(base.length + 1);
    renderMeta(reply.meta, meta);
    $("stats").textContent = metaLine(meta);
    updateActions();
    scrollDown(follow);
  }

  function stop() {
    if (!state.controller) return;
    state.stopped = true;
    state.controller.abort(); // closes the connection; the server aborts the request
  }

  function submitInput() {
    const text = $("input").value;
    if (!text.trim() || state.controller || state.locked) return;
    $("input").value = "";
    send(text);
  }

  // --- copy, edit, regenerate --------------------------------------------------------------------

  async function copyText(text) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch {
      // no clipboard API here (plain http from another machine is not a secure context)
    }
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "offscreen";
    document.body.append(area);
    area.select();
    let ok = false;
    try {
      ok = document.execCommand("copy");
    } catch {
      ok = false;
    }
    area.remove();
    return ok;
  }

  async function copyFrom(b, text) {
    const ok = await copyText(text);
    const label = b.textContent;
    b.textContent = ok ? "Copied" : "Copy failed";
    setTimeout(() => {
      if (b.isConnected) b.textContent = label;
    }, 1500);
  }

  function startEdit(msg) {
    if (msg.classList.contains("editing")) return;
    const index = Number(msg.dataset.index);
    msg.classList.add("editing");
    const content = msg.querySelector(".content");
    const area = document.createElement("textarea");
    area.className = "edit-input";
    area.value = msg.dataset.raw;
    area.rows = Math.min(10, Math.max(2, area.value.split("\n").length));
    area.setAttribute("aria-label", "Edit message");
    const row = document.createElement("div");
    row.className = "edit-buttons";
    const save = button("Send", "edit-send", { "data-edit": "send" });
    const cancel = button("Cancel", "plain", { "data-edit": "cancel" });
    row.append(save, cancel);
    content.replaceChildren(area, row);
    const finish = (resend) => {
      const text = area.value;
      if (resend && (!text.trim() || state.controller || state.locked)) return;
      msg.classList.remove("editing");
      content.textContent = msg.dataset.raw;
      if (resend) send(text, index);
    };
    save.addEventListener("click", () => finish(true));
    cancel.addEventListener("click", () => finish(false));
    area.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
        e.preventDefault();
        finish(true);
      } else if (e.key === "Escape") {
        finish(false);
      }
    });
    area.focus();
  }

  $("log").addEventListener("click", (e) => {
    const b = e.target.closest("button");
    if (!b) return;
    if (b.classList.contains("copy-code")) {
      const code = b.closest(".code-block").querySelector("code");
      copyFrom(b, code ? code.textContent : "");
      return;
    }
    const msg = b.closest(".msg");
    const action = b.dataset.action;
    if (!msg || !action || b.disabled) return;
    if (action === "copy") copyFrom(b, msg.dataset.raw);
    else if (action === "edit") startEdit(msg);
    else if (action === "regenerate") {
      const index = Number(msg.dataset.index);
      const question = state.conv.messages[index - 1];
      if (question && question.role === "user") send(question.content, index - 1);
    }
  });

  // --- settings, kept in this browser ------------------------------------------------------------

  function restoreSettings() {
    const saved = local ? readJSON(SETTINGS_STORE) : null;
    if (!saved || typeof saved !== "object") return;
    for (const id of SETTING_IDS) if (typeof saved[id] === "string") $(id).value = saved[id];
  }

  function saveSettings() {
    if (!local) return;
    const values = Object.fromEntries(SETTING_IDS.map((id) => [id, $(id).value]));
    try {
      local.setItem(SETTINGS_STORE, JSON.stringify(values));
    } catch {
      // full storage: the settings just do not outlive the page
    }
  }

  // --- wiring ------------------------------------------------------------------------------------

  $("chat-form").addEventListener("submit", (e) => {
    e.preventDefault();
    submitInput();
  });
  $("input").addEventListener("keydown", (e) => {
    // Enter sends, Shift+Enter is a new line; Enter that ends an IME composition (CJK input) is not a send.
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
      e.preventDefault();
      submitInput();
    }
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", startNewChat);
  $("new-chat-bar").addEventListener("click", startNewChat);
  $("open-sidebar").addEventListener("click", openSidebar);
  $("close-sidebar").addEventListener("click", closeSidebar);
  $("scrim").addEventListener("click", closeSidebar);
  for (const id of SETTING_IDS) $(id).addEventListener("input", saveSettings);
  $("key-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const key = $("api-key").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORE, key);
    $("key-save").disabled = true;
    await probeServer(); // checks the key at once: a wrong one is reported, not found later
    $("key-save").disabled = false;
    if (!state.locked && state.pending) {
      const pending = state.pending;
      state.pending = null;
      send(pending.text, pending.baseLength);
    }
  });
  // Another tab changed the stored conversations: show the new list (and the open one's turns).
  window.addEventListener("storage", (e) => {
    if (e.key !== null && !e.key.startsWith(CHAT_PREFIX)) return;
    renderList();
    const open = state.conv && loadConversation(state.conv.id);
    const editing = $("log").querySelector(".msg.editing");
    if (open && !state.controller && !editing && e.key === CHAT_PREFIX + open.id) {
      state.conv = open;
      renderLog(open.messages);
    }
  });

  restoreSettings();
  let current = null;
  try {
    current = loadConversation(sessionStorage.getItem(CURRENT_STORE));
  } catch {
    current = null;
  }
  openConversation(current || newConversation());
  loadInfo();
  probeServer();
  $("input").focus();
})();
