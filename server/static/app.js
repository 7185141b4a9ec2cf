// The chat page: talks only to this daemon's OpenAI-compatible /v1/chat/completions (stream: true).
// No framework, no build step, nothing fetched from elsewhere.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = "chatglm-serve.api-key";
  const FENCE = "```";

  const state = {
    history: [], // finished turns as OpenAI messages, sent back with every request
    model: null, // the served name from /v1/models (kept so strict model-name mode works)
    controller: null, // AbortController of the reply being streamed
    stopped: false,
    pending: null, // text to send once an API key has been given
    epoch: 0, // bumped by Clear, so a reply cut off by Clear is not filed into the new conversation
  };

  // --- API key: asked for once, kept for this tab's session -------------------------------------

  const apiKey = () => sessionStorage.getItem(KEY_STORE) || "";

  function requestHeaders() {
    const h = { "Content-Type": "application/json" };
    const key = apiKey();
    if (key) h.Authorization = `Bearer ${key}`;
    return h;
  }

  function askForKey(detail) {
    const hadKey = apiKey() !== "";
    if (hadKey) sessionStorage.removeItem(KEY_STORE);
    $("key-message").textContent = hadKey
      ? `The API key was refused${detail ? ` (${detail})` : ""}. Enter the right key.`
      : "This server needs an API key.";
    $("key-form").classList.toggle("refused", hadKey);
    $("key-form").hidden = false;
    $("api-key").value = "";
    $("api-key").focus();
  }

  async function probeServer() {
    let res;
    try {
      res = await fetch("v1/models", { headers: requestHeaders() });
    } catch {
      return; // the first chat request will report an unreachable server
    }
    if (res.status === 401) {
      askForKey(await errorMessage(res));
      return;
    }
    if (!res.ok) return;
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

  // --- rendering: model text only ever goes in through textContent ------------------------------

  // Fenced blocks become <pre><code>; everything is set as text, so markup in a reply never runs.
  function renderReply(el, text) {
    const nodes = [];
    text.split(FENCE).forEach((part, i) => {
      if (i % 2 === 0) {
        // the line break that closes a fence belongs to the block, not to the text after it
        if (i > 0 && part.startsWith("\n")) part = part.slice(1);
        if (part) {
          const span = document.createElement("span");
          span.className = "text";
          span.textContent = part;
          nodes.push(span);
        }
        return;
      }
      // The fence's first line may name the language (```python); an open fence may still grow.
      let code = part;
      let lang = "";
      const nl = part.indexOf("\n");
      if (nl >= 0 && /^[\w+#.-]*$/.test(part.slice(0, nl).trim())) {
        lang = part.slice(0, nl).trim();
        code = part.slice(nl + 1);
      }
      const pre = document.createElement("pre");
      const codeEl = document.createElement("code");
      if (lang) codeEl.dataset.lang = lang;
      codeEl.textContent = code.replace(/\n$/, "");
      pre.append(codeEl);
      nodes.push(pre);
    });
    el.replaceChildren(...nodes);
  }

  function nearBottom() {
    const log = $("log");
    return log.scrollHeight - log.scrollTop - log.clientHeight < 80;
  }

  function scrollDown(force) {
    if (force || nearBottom()) $("log").scrollTop = $("log").scrollHeight;
  }

  function addMessage(role, text) {
    $("empty-hint").hidden = true;
    const wrap = document.createElement("div");
    wrap.className = `msg ${role}`;
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = role === "user" ? "You" : "ChatGLM";
    const content = document.createElement("div");
    content.className = "content";
    const meta = document.createElement("div");
    meta.className = "meta";
    wrap.append(who, content, meta);
    if (role === "user") content.textContent = text;
    else renderReply(content, text);
    $("log").append(wrap);
    scrollDown(true);
    return { wrap, content, meta };
  }

  function showError(msg, text) {
    msg.wrap.classList.add("error");
    const note = document.createElement("div");
    note.className = "error-text";
    note.textContent = text;
    msg.wrap.insertBefore(note, msg.meta);
    scrollDown(true);
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

  function buildRequest(text) {
    const messages = [];
    const system = $("system-prompt").value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages.push(...state.history, { role: "user", content: text });
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
    $("send").disabled = busy;
    $("stop").disabled = !busy;
    document.body.classList.toggle("busy", busy);
  }

  function formatStats(tokens, exact, tStart, tFirst, tEnd) {
    // tokens/s over the generation (after the first token), as llama.cpp's page reports it
    const gen = tFirst !== null ? (tEnd - tFirst) / 1000 : 0;
    const rate = tokens > 1 && gen > 0 ? (tokens - 1) / gen : tokens / Math.max((tEnd - tStart) / 1000, 1e-3);
    const parts = [`${exact ? "" : "≈"}${tokens} token${tokens === 1 ? "" : "s"}`, `${rate.toFixed(1)} tokens/s`];
    if (tFirst !== null) parts.push(`first token after ${((tFirst - tStart) / 1000).toFixed(2)} s`);
    return parts.join(" · ");
  }

  async function send(text) {
    if (state.controller) return;
    const body = buildRequest(text);
    const user = addMessage("user", text);
    const reply = addMessage("assistant", "");
    reply.wrap.classList.add("streaming");
    const controller = new AbortController();
    const epoch = state.epoch;
    state.controller = controller;
    state.stopped = false;
    setBusy(true);

    let answer = "";
    let usage = null;
    let chunks = 0;
    let failure = null;
    let rendering = false;
    const tStart = performance.now();
    let tFirst = null;
    const render = () => {
      if (rendering) return;
      rendering = true;
      requestAnimationFrame(() => {
        rendering = false;
        const follow = nearBottom();
        renderReply(reply.content, answer);
        scrollDown(follow);
      });
    };

    const keyUsed = sessionStorage.getItem(KEY_STORE);
    let resend = null;
    try {
      const res = await fetch("v1/chat/completions", {
        method: "POST",
        headers: requestHeaders(),
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (res.status === 401) {
        // nothing was generated: take the turn back and send it again once we have a key
        user.wrap.remove();
        reply.wrap.remove();
        $("empty-hint").hidden = $("log").querySelector(".msg") !== null;
        const keyNow = sessionStorage.getItem(KEY_STORE);
        if (keyNow && keyNow !== keyUsed) {
          resend = text; // a key was given while this request was in flight: send again with it
          return;
        }
        state.pending = text;
        askForKey(await errorMessage(res));
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
      if (resend) setTimeout(() => send(resend), 0);
    }

    if (epoch !== state.epoch) return; // cleared meanwhile: its elements are gone already
    const tEnd = performance.now();
    reply.wrap.classList.remove("streaming");
    renderReply(reply.content, answer);
    if (failure) {
      // a failed turn is not part of the conversation; give the text back for another try
      user.wrap.classList.add("dropped");
      reply.wrap.classList.add("dropped");
      showError(reply, failure);
      if (!$("input").value) $("input").value = text;
      return;
    }
    if (state.stopped && !answer) {
      user.wrap.classList.add("dropped");
      reply.wrap.classList.add("dropped");
      reply.meta.textContent = "stopped before any reply";
      return;
    }
    // Like the seed's demo, a stopped reply stays in the history as far as it got.
    state.history.push({ role: "user", content: text }, { role: "assistant", content: answer });
    const tokens = usage ? usage.completion_tokens : chunks;
    const stats = formatStats(tokens, Boolean(usage), tStart, tFirst, tEnd);
    reply.meta.textContent = state.stopped ? `stopped · ${stats}` : stats;
    $("stats").textContent = reply.meta.textContent;
    scrollDown(false);
  }

  function stop() {
    if (!state.controller) return;
    state.stopped = true;
    state.controller.abort(); // closes the connection; the server aborts the request
  }

  function clearConversation() {
    stop();
    state.epoch += 1;
    state.history = [];
    state.pending = null;
    for (const el of $("log").querySelectorAll(".msg")) el.remove();
    $("empty-hint").hidden = false;
    $("stats").textContent = "";
    $("input").focus();
  }

  function submitInput() {
    const text = $("input").value;
    if (!text.trim() || state.controller) return;
    $("input").value = "";
    send(text);
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
  $("clear").addEventListener("click", clearConversation);
  $("key-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const key = $("api-key").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORE, key);
    $("key-form").hidden = true;
    await probeServer(); // checks the key at once: a wrong one is reported, not found later
    if ($("key-form").hidden && state.pending) {
      const pending = state.pending;
      state.pending = null;
      send(pending);
    }
  });

  probeServer();
  $("input").focus();
})();
