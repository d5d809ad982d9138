// The gateway playground: plain JavaScript, no build step, no dependency.
//
// Chat: POST /api/chat (non-streaming) answers 202 with a `stream_url` that carries a short-lived
// token, because EventSource cannot send an Authorization header. The reply is followed with
// EventSource; when the connection drops, the browser reconnects by itself with Last-Event-ID and
// the gateway replays exactly the events after it, so the reply resumes with nothing lost or
// repeated. The stream is closed on `data: [DONE]`, otherwise the browser would reconnect forever.
"use strict";

(() => {
  const KEY_STORAGE = "gateway.playground.apiKey";
  const LIVE = new Set(["pending", "streaming"]);
  // a reply that ended without its answer: the gateway regenerates it on request
  const REGENERABLE = new Set(["refused", "failed", "interrupted", "cancelled"]);
  const POLL_MS = 500;
  const LEADERBOARD_TRIES = 20;

  const $ = (selector, root = document) => root.querySelector(selector);
  const byTestId = (id, root = document) => $(`[data-testid="${id}"]`, root);

  const state = {
    key: localStorage.getItem(KEY_STORAGE) || "",
    threadId: null,
    chat: null, // the reply being followed: {messageId, follower, view}
    arena: null, // the comparison being followed: {id, follower}
    battles: -1, // battles counted by the leaderboard last shown
  };

  // ---------------------------------------------------------------- HTTP

  class ApiError extends Error {
    constructor(status, message, type) {
      super(message);
      this.status = status;
      this.type = type;
    }
  }

  async function api(method, path, body) {
    const headers = { Authorization: `Bearer ${state.key}` };
    const init = { method, headers };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const resp = await fetch(path, init);
    const text = await resp.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (_) {
      data = null;
    }
    if (!resp.ok) {
      const error = (data && data.error) || {};
      throw new ApiError(resp.status, error.message || `${resp.status} ${resp.statusText}`, error.type);
    }
    return data;
  }

  // crypto.randomUUID needs a secure context; a gateway on a LAN address over http is not one
  function uuid4() {
    if (window.crypto && crypto.randomUUID) return crypto.randomUUID();
    const b = crypto.getRandomValues(new Uint8Array(16));
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    const h = Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
    return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
  }

  function withQuery(url, name, value) {
    return `${url}${url.includes("?") ? "&" : "?"}${name}=${encodeURIComponent(value)}`;
  }

  // ---------------------------------------------------------------- SSE

  // Follows one gateway stream with EventSource. `on` has metadata, delta, usage, done, error
  // (server events, data parsed), reconnecting (the browser is resuming), end(how): "done" after
  // `data: [DONE]`, "closed" when the browser gave up (an HTTP error, or 204: nothing left).
  class Follower {
    constructor(url, on) {
      this.url = url;
      this.on = on;
      this.lastEventId = "";
      this.opens = 0;
      this.source = null;
      this.finished = false;
    }

    open(lastEventId) {
      // an explicit resume point goes in the query: a new EventSource cannot set Last-Event-ID
      const url = lastEventId ? withQuery(this.url, "lastEventId", lastEventId) : this.url;
      const source = new EventSource(url);
      this.source = source;
      source.addEventListener("open", () => {
        this.opens += 1;
        if (this.on.open) this.on.open(this.opens);
      });
      source.addEventListener("message", (e) => this.message(e));
      for (const name of ["metadata", "usage", "done"]) {
        source.addEventListener(name, (e) => this.event(name, e));
      }
      // "error" is both the server's `event: error` (a MessageEvent with data) and the
      // browser's own connection error (a plain Event)
      source.addEventListener("error", (e) => {
        if (e instanceof MessageEvent && e.data) {
          this.event("error", e);
        } else if (source.readyState === EventSource.CLOSED) {
          this.end("closed");
        } else if (this.on.reconnecting) {
          this.on.reconnecting(this.lastEventId);
        }
      });
    }

    track(e) {
      if (e.lastEventId) this.lastEventId = e.lastEventId;
    }

    message(e) {
      if (e.data === "[DONE]") {
        this.end("done");
        return;
      }
      this.track(e);
      const data = JSON.parse(e.data);
      if (typeof data.delta === "string") this.on.delta(data.delta, data);
    }

    event(name, e) {
      this.track(e);
      const handler = this.on[name];
      if (handler) handler(JSON.parse(e.data));
    }

    // drop the connection and resume from the last event seen (what the browser does by
    // itself after a network error; exposed for trying it out: playground.dropStream())
    reconnect() {
      if (this.finished) return false;
      this.source.close();
      this.open(this.lastEventId);
      return true;
    }

    close() {
      this.finished = true;
      if (this.source) this.source.close();
    }

    end(how) {
      if (this.finished) return;
      this.close();
      this.on.end(how);
    }
  }

  // ---------------------------------------------------------------- API key

  const keyInput = byTestId("api-key");
  const keyStatus = byTestId("key-status");

  function setKeyStatus(text, ok) {
    keyStatus.textContent = text;
    keyStatus.dataset.state = ok === undefined ? "" : ok ? "ok" : "bad";
  }

  async function checkKey() {
    if (!state.key) {
      setKeyStatus("No key saved", false);
      return false;
    }
    try {
      const me = await api("GET", "/api/me");
      const scopes = me.key ? me.key.scopes.join(", ") : "jwt";
      setKeyStatus(`Key OK · ${scopes}`, true);
    } catch (e) {
      setKeyStatus(`Key rejected: ${e.message}`, false);
      return false;
    }
    await Promise.allSettled([loadModels(), loadThreads(), loadLeaderboard()]);
    return true;
  }

  byTestId("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    state.key = keyInput.value.trim();
    if (state.key) localStorage.setItem(KEY_STORAGE, state.key);
    else localStorage.removeItem(KEY_STORAGE);
    checkKey();
  });

  byTestId("forget-key").addEventListener("click", () => {
    state.key = "";
    keyInput.value = "";
    localStorage.removeItem(KEY_STORAGE);
    setKeyStatus("No key saved", false);
  });

  // ---------------------------------------------------------------- tabs

  // Chat, Arena, Usage, then any tab a further script fills in (admin.js: Admin)
  const tabs = Array.from(document.querySelectorAll('.tabs [role="tab"]'));

  function selectTab(tab) {
    for (const t of tabs) {
      const selected = t === tab;
      t.setAttribute("aria-selected", String(selected));
      t.tabIndex = selected ? 0 : -1;
      document.getElementById(t.getAttribute("aria-controls")).hidden = !selected;
    }
    tab.focus();
    if (tab === tabs[1]) loadLeaderboard().catch(() => {});
    if (tab === tabs[2]) loadUsage().catch((e) => { byTestId("usage-range").textContent = `(not loaded: ${e.message})`; });
  }

  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => selectTab(tab));
    tab.addEventListener("keydown", (e) => {
      if (e.key === "ArrowRight" || e.key === "ArrowLeft") {
        e.preventDefault();
        selectTab(tabs[(i + (e.key === "ArrowRight" ? 1 : tabs.length - 1)) % tabs.length]);
      }
    });
  });

  // ---------------------------------------------------------------- models and threads

  const modelSelect = byTestId("model-select");

  async function loadModels() {
    const body = await api("GET", "/v1/models");
    const current = modelSelect.value;
    modelSelect.replaceChildren(new Option("auto", "auto"));
    for (const m of body.data) modelSelect.add(new Option(`${m.id} (${m.owned_by})`, m.id));
    if ([...modelSelect.options].some((o) => o.value === current)) modelSelect.value = current;
  }

  const threadList = byTestId("thread-list");

  async function loadThreads() {
    const body = await api("GET", "/api/threads?limit=30");
    threadList.replaceChildren();
    for (const t of body.threads) {
      const li = document.createElement("li");
      const button = document.createElement("button");
      button.type = "button";
      button.className = "thread";
      button.dataset.threadId = t.id;
      button.dataset.testid = "thread";
      if (t.id === state.threadId) button.setAttribute("aria-current", "true");
      const when = new Date(t.created_at).toLocaleString();
      button.textContent = t.title || `Chat of ${when}`;
      button.title = when;
      button.addEventListener("click", () => openThread(t.id));
      li.append(button);
      threadList.append(li);
    }
  }

  async function openThread(threadId) {
    if (state.chat) return; // one reply at a time
    const thread = await api("GET", `/api/threads/${threadId}`);
    state.threadId = threadId;
    messagesEl.replaceChildren();
    for (const m of thread.messages) {
      if (m.role === "user") {
        addUserMessage(withToolRound(m.content, toolOutputs(m)));
      } else if (m.role === "assistant") {
        const view = addAssistantMessage(m.id);
        view.text.textContent = withToolRound(m.content, toolCalls(m));
        view.setMeta({ model: m.model, provider: m.provider, category: (m.metadata || {}).category,
                       fallback_from: (m.metadata || {}).fallback_from });
        view.setStatus(m.status);
      }
    }
    for (const b of threadList.querySelectorAll("button")) {
      b.toggleAttribute("aria-current", b.dataset.threadId === threadId);
    }
    scrollToEnd();
  }

  // A thread continued through /v1/responses may hold tool rounds: a reply's calls
  // (metadata.tool_calls) and the tools' outputs sent back (the user message's metadata.messages).
  function toolCalls(m) {
    return ((m.metadata || {}).tool_calls || []).map((c) => `→ ${c.function.name}(${c.function.arguments})`);
  }

  function toolOutputs(m) {
    return ((m.metadata || {}).messages || []).filter((r) => r.role === "tool")
      .map((r) => `← ${r.tool_call_id}: ${typeof r.content === "string" ? r.content : "(parts)"}`);
  }

  function withToolRound(content, lines) {
    return [content, ...lines].filter(Boolean).join("\n");
  }

  byTestId("new-thread").addEventListener("click", () => {
    if (state.chat) return;
    state.threadId = null;
    messagesEl.replaceChildren();
    for (const b of threadList.querySelectorAll("button")) b.removeAttribute("aria-current");
    messageInput.focus();
  });

  // ---------------------------------------------------------------- chat

  const messagesEl = byTestId("messages");
  const messageInput = byTestId("message-input");
  const sendButton = byTestId("send");
  const stopButton = byTestId("stop");
  const chatStatus = byTestId("chat-status");

  function scrollToEnd() {
    messagesEl.scrollTop = messagesEl.scrollHeight;
  }

  function clearHint() {
    const hint = byTestId("empty-hint", messagesEl);
    if (hint) hint.remove();
  }

  function element(tag, className, testid, text) {
    const el = document.createElement(tag);
    if (className) el.className = className;
    if (testid) el.dataset.testid = testid;
    if (text !== undefined) el.textContent = text;
    return el;
  }

  function addUserMessage(content) {
    clearHint();
    const li = element("li", "message user", "user-message");
    li.append(element("div", "who", null, "You"), element("div", "text", "user-text", content));
    messagesEl.append(li);
    scrollToEnd();
    return li;
  }

  // one assistant reply on the page: its text grows by deltas, its status and metadata are shown
  function addAssistantMessage(messageId) {
    clearHint();
    const li = element("li", "message assistant", "assistant-message");
    li.dataset.messageId = messageId;
    const head = element("div", "who", null, "Assistant");
    const status = element("span", "badge", "reply-status", "pending");
    head.append(" ", status);
    const text = element("div", "text", "reply-text");
    text.append(document.createTextNode(""));
    const meta = element("dl", "meta", "reply-meta");
    const usage = element("div", "usage", "reply-usage");
    li.append(head, text, meta, usage);
    messagesEl.append(li);
    scrollToEnd();
    return {
      li, text,
      append(delta) {
        text.firstChild.appendData(delta);
        scrollToEnd();
      },
      setStatus(value) {
        li.dataset.status = value;
        status.textContent = value;
        status.dataset.status = value;
      },
      setMeta(m) {
        meta.replaceChildren();
        const fields = [["model", m.model], ["provider", m.provider], ["category", m.category]];
        if (m.fallback_from) fields.push(["fallback from", m.fallback_from]);
        for (const [name, value] of fields) {
          const group = element("div", null, `meta-${name.replace(" ", "-")}`);
          group.append(element("dt", null, null, name), element("dd", null, null, value == null ? "—" : String(value)));
          meta.append(group);
        }
      },
      setUsage(u) {
        usage.textContent = `${u.prompt_tokens} prompt + ${u.completion_tokens} completion = ${u.total_tokens} tokens`
          + (u.estimated ? " (estimated)" : "");
      },
      setError(err) {
        li.append(element("p", "error", "reply-error", `${err.type}: ${err.message}`));
      },
    };
  }

  function setBusy(busy) {
    sendButton.disabled = busy;
    stopButton.disabled = !busy;
    messageInput.readOnly = busy;
  }

  // The error queue: a send that fails for a reason that may pass (no connection, a
  // 5xx, 408, 429) is tried again after 1 s, 2 s and 4 s with the same client_message_id, so the
  // gateway stores it once whatever happened to the earlier attempts (a retry of a send that did
  // arrive is answered as a duplicate, with the same reply). After the last try the message stays
  // on the page with its id and a Retry button that starts the queue again.
  const RETRY_DELAYS_MS = [1000, 2000, 4000];

  function retryable(e) {
    return !(e instanceof ApiError) || e.status >= 500 || e.status === 408 || e.status === 429;
  }

  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  async function send(content) {
    if (!state.key) {
      chatStatus.textContent = "Paste an API key first.";
      keyInput.focus();
      return;
    }
    const userLi = addUserMessage(content);
    const body = { content, model: modelSelect.value, thread_id: state.threadId, client_message_id: uuid4(),
                   stream: false };
    userLi.dataset.clientMessageId = body.client_message_id;
    await deliver(userLi, body);
  }

  async function deliver(userLi, body) {
    setBusy(true);
    chatStatus.textContent = "Sending…";
    const badge = userLi.querySelector('[data-testid="send-state"]') || element("span", "badge", "send-state");
    userLi.querySelector(".who").append(" ", badge);
    badge.textContent = "sending…";
    userLi.dataset.attempts = "0";
    for (const old of userLi.querySelectorAll('[data-testid="send-error"], [data-testid="retry-send"]')) old.remove();
    let accepted;
    for (let attempt = 0; ; attempt++) {
      userLi.dataset.attempts = String(attempt + 1);
      try {
        accepted = await api("POST", "/api/chat", body);
        break;
      } catch (e) {
        if (attempt < RETRY_DELAYS_MS.length && retryable(e)) {
          badge.textContent = "retrying…";
          userLi.dataset.sendState = "retrying";
          chatStatus.textContent = `Not sent (${e.message}); retrying… (${attempt + 1} of ${RETRY_DELAYS_MS.length})`;
          await sleep(RETRY_DELAYS_MS[attempt]);
          continue;
        }
        badge.textContent = "not sent";
        userLi.dataset.sendState = "failed";
        userLi.append(element("p", "error", "send-error", e.message));
        if (retryable(e)) {
          const again = element("button", "secondary", "retry-send", "Retry");
          again.type = "button";
          again.addEventListener("click", () => { if (!state.chat) deliver(userLi, body); });
          userLi.append(again);
        }
        chatStatus.textContent = `Not sent: ${e.message}`;
        setBusy(false);
        return;
      }
    }
    badge.textContent = accepted.duplicate ? "sent (once)" : "sent";
    userLi.dataset.sendState = "sent";
    messageInput.value = "";
    const newThread = state.threadId !== accepted.thread_id;
    state.threadId = accepted.thread_id;
    follow(accepted.assistant_message_id, accepted.stream_url);
    if (newThread) loadThreads().catch(() => {});
  }

  function follow(messageId, streamUrl) {
    const view = addAssistantMessage(messageId);
    view.setStatus("streaming");
    chatStatus.textContent = "Streaming…";
    const chat = { messageId, view, follower: null };
    state.chat = chat;
    view.li.dataset.reconnects = "0";
    chat.follower = new Follower(streamUrl, {
      open(opens) {
        view.li.dataset.reconnects = String(opens - 1);
        chatStatus.textContent = "Streaming…";
      },
      reconnecting(lastId) {
        chatStatus.textContent = `Connection lost; resuming after ${lastId || "the start"}…`;
      },
      metadata: (m) => view.setMeta(m),
      delta: (text) => view.append(text),
      usage: (u) => view.setUsage(u),
      done: (d) => view.setStatus(d.finish_reason === "stop" || d.finish_reason === "length" ? "complete" : d.finish_reason),
      error: (err) => {
        view.setError(err);
        view.setStatus("failed");
      },
      end: (how) => finishChat(chat, how),
    });
    chat.follower.open();
  }

  // the stream ended: show the saved row's status; if the browser gave up on the stream before
  // [DONE] (e.g. the gateway answered an error), poll the message and show the rest of it
  async function finishChat(chat, how) {
    const { view, messageId } = chat;
    view.li.dataset.end = how === "done" ? "stream" : "poll";
    try {
      let message = await api("GET", `/api/messages/${messageId}`);
      while (how !== "done" && LIVE.has(message.status)) {
        chatStatus.textContent = "Stream unavailable; polling…";
        await new Promise((r) => setTimeout(r, POLL_MS));
        message = await api("GET", `/api/messages/${messageId}`);
      }
      const shown = view.text.textContent;
      if (how !== "done" && message.content.startsWith(shown)) view.append(message.content.slice(shown.length));
      view.setStatus(message.status);
      if (REGENERABLE.has(message.status) && message.reply_to) offerRegenerate(view, message.reply_to);
      chatStatus.textContent = "";
    } catch (e) {
      chatStatus.textContent = `Could not load the saved reply: ${e.message}`;
    }
    if (state.chat === chat) state.chat = null;
    setBusy(false);
    messageInput.focus();
    loadThreads().catch(() => {});
  }

  // POST /api/messages/{user message}/regenerate: a new reply to the same message, through the
  // policy like any turn, followed like a sent one; the ended reply stays in the thread
  function offerRegenerate(view, userMessageId) {
    const button = element("button", "secondary", "regenerate", "Regenerate");
    button.type = "button";
    button.addEventListener("click", async () => {
      if (state.chat) return;
      button.disabled = true;
      setBusy(true);
      chatStatus.textContent = "Regenerating…";
      try {
        const accepted = await api("POST", `/api/messages/${userMessageId}/regenerate`, {});
        button.remove();
        follow(accepted.assistant_message_id, accepted.stream_url);
      } catch (e) {
        button.disabled = false;
        chatStatus.textContent = `Could not regenerate: ${e.message}`;
        setBusy(false);
      }
    });
    view.li.append(button);
  }

  byTestId("chat-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const content = messageInput.value.trim();
    if (content && !state.chat) send(content);
  });

  messageInput.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      byTestId("chat-form").requestSubmit();
    }
  });

  // Stop: the gateway stops the upstream, saves the partial reply as cancelled, and ends the
  // stream with usage, done (finish_reason "cancelled") and [DONE]
  stopButton.addEventListener("click", async () => {
    const chat = state.chat;
    if (!chat) return;
    stopButton.disabled = true;
    chatStatus.textContent = "Stopping…";
    try {
      await api("POST", `/api/messages/${chat.messageId}/cancel`);
    } catch (e) {
      chatStatus.textContent = `Could not stop: ${e.message}`;
      stopButton.disabled = false;
    }
  });

  // ---------------------------------------------------------------- arena

  const arenaInput = byTestId("arena-input");
  const arenaSend = byTestId("arena-send");
  const arenaStatus = byTestId("arena-status");
  const voteButtons = [...document.querySelectorAll("[data-winner]")];
  const voteStatus = byTestId("vote-status");
  const slots = {};
  for (const name of ["a", "b"]) {
    slots[name] = {
      text: byTestId(`slot-${name}-text`),
      status: byTestId(`slot-${name}-status`),
      reveal: byTestId(`reveal-${name}`),
      setStatus(value) {
        this.status.textContent = value;
        this.status.dataset.status = value;
      },
    };
  }

  function resetArena() {
    for (const slot of Object.values(slots)) {
      slot.text.replaceChildren(document.createTextNode(""));
      slot.setStatus("waiting");
      slot.reveal.hidden = true;
      slot.reveal.textContent = "";
      const err = slot.text.parentElement.querySelector(".error");
      if (err) err.remove();
    }
    for (const b of voteButtons) {
      b.disabled = true;
      b.removeAttribute("aria-pressed");
    }
    voteStatus.textContent = "";
  }

  async function compare(content) {
    if (!state.key) {
      arenaStatus.textContent = "Paste an API key first.";
      keyInput.focus();
      return;
    }
    arenaSend.disabled = true;
    arenaStatus.textContent = "Starting…";
    resetArena();
    let accepted;
    try {
      accepted = await api("POST", "/api/arena", { content, client_message_id: uuid4(), stream: false });
    } catch (e) {
      arenaStatus.textContent = `Not started: ${e.message}`;
      for (const slot of Object.values(slots)) slot.setStatus("idle");
      arenaSend.disabled = false;
      return;
    }
    const arena = { id: accepted.comparison_id, follower: null };
    state.arena = arena;
    arenaStatus.textContent = "Both models are answering…";
    for (const slot of Object.values(slots)) slot.setStatus("streaming");
    arena.follower = new Follower(accepted.stream_url, {
      reconnecting: () => { arenaStatus.textContent = "Connection lost; resuming…"; },
      open: () => { arenaStatus.textContent = "Both models are answering…"; },
      delta: (text, data) => slots[data.slot].text.firstChild.appendData(text),
      done: (d) => slots[d.slot].setStatus(d.finish_reason === "stop" || d.finish_reason === "length" ? "complete" : d.finish_reason),
      error: (err) => {
        slots[err.slot].setStatus("failed");
        slots[err.slot].text.parentElement.append(element("p", "error", `slot-${err.slot}-error`, err.message));
      },
      end: () => finishArena(arena),
    });
    arena.follower.open();
  }

  async function finishArena(arena) {
    try {
      const comparison = await api("GET", `/api/comparisons/${arena.id}`);
      for (const name of ["a", "b"]) slots[name].setStatus(comparison.slots[name].status);
      const statuses = ["a", "b"].map((n) => comparison.slots[n].status);
      // a slot the policy refused never ran: nothing to compare, and the gateway refuses the vote
      const refused = statuses.includes("refused");
      const votable = !refused && !statuses.some((s) => LIVE.has(s));
      for (const b of voteButtons) b.disabled = !votable;
      arenaStatus.textContent = votable ? "Which answer is better?"
        : refused ? "A model was refused by a limit: this comparison cannot be voted on."
        : "A reply is still being generated.";
    } catch (e) {
      arenaStatus.textContent = `Could not load the comparison: ${e.message}`;
    }
    arenaSend.disabled = false;
  }

  async function vote(winner) {
    const arena = state.arena;
    if (!arena) return;
    for (const b of voteButtons) {
      b.disabled = true;
      b.setAttribute("aria-pressed", String(b.dataset.winner === winner));
    }
    // the count the new battle must raise: unknown until a leaderboard has been read (the first
    // load may still be waiting for a fit), so read it now rather than take any board as new
    if (state.battles < 0) await loadLeaderboard().catch(() => {});
    const battlesBefore = state.battles;
    try {
      const comparison = await api("POST", `/api/comparisons/${arena.id}/vote`, { winner });
      for (const name of ["a", "b"]) {
        const s = comparison.slots[name];
        slots[name].reveal.textContent = `Model ${name.toUpperCase()} was ${s.model}` + (s.provider ? ` (${s.provider})` : "");
        slots[name].reveal.dataset.model = s.model;
        slots[name].reveal.hidden = false;
      }
      const label = { a: "A is better", b: "B is better", tie: "a tie", both_bad: "both are bad" }[comparison.winner];
      voteStatus.textContent = `Vote recorded: ${label}.`;
      state.arena = null;
      leaderboardAfterVote(battlesBefore).catch(() => {});
    } catch (e) {
      voteStatus.textContent = `Vote not recorded: ${e.message}`;
      for (const b of voteButtons) b.disabled = false;
    }
  }

  for (const b of voteButtons) b.addEventListener("click", () => vote(b.dataset.winner));

  byTestId("arena-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const content = arenaInput.value.trim();
    if (content) compare(content);
  });

  // ---------------------------------------------------------------- charts (SVG, drawn here)

  const SVG_NS = "http://www.w3.org/2000/svg"; // a namespace name, not a download
  const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
                   "#9c755f", "#bab0ac"];

  function svgEl(tag, attrs, parent, text) {
    const el = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value !== undefined && value !== null) el.setAttribute(name, String(value));
    }
    if (text !== undefined) el.textContent = text;
    if (parent) parent.append(el);
    return el;
  }

  function chartSvg(box, width, height, label) {
    const svg = svgEl("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img", "aria-label": label });
    box.replaceChildren(svg);
    return svg;
  }

  function emptyChart(box, text) {
    box.replaceChildren(element("p", "empty-chart", null, text));
  }

  // round steps for an axis over [lo, hi]: about `count` of them, at 1, 2, 2.5 or 5 times a power of 10
  function ticks(lo, hi, count = 4) {
    if (!(hi > lo)) return [lo];
    const raw = (hi - lo) / count;
    const mag = 10 ** Math.floor(Math.log10(raw));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw);
    const out = [];
    for (let v = Math.ceil(lo / step - 1e-9) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
    return out;
  }

  function compact(value) {
    const abs = Math.abs(value);
    if (abs >= 1e6) return `${Number((value / 1e6).toPrecision(3))}M`;
    if (abs >= 1e3) return `${Number((value / 1e3).toPrecision(3))}k`;
    return String(Number(value.toPrecision(3)));
  }

  const dollars = (value) => (value === 0 ? "$0" : `$${Number(value.toPrecision(2))}`);

  function colourOf(models) {
    const colours = new Map();
    [...models].sort().forEach((m, i) => colours.set(m, PALETTE[i % PALETTE.length]));
    return colours;
  }

  // -- the leaderboard as LMArena draws it: a point per model, a whisker for its interval

  function drawRatings(box, models) {
    if (!models.length) return emptyChart(box, "No votes yet.");
    const rowH = 28, left = 190, right = 24, top = 10, bottom = 30, width = 640;
    const height = top + bottom + rowH * models.length;
    const lo = Math.min(...models.map((m) => Math.min(m.ci_low, m.lc_ci_low)));
    const hi = Math.max(...models.map((m) => Math.max(m.ci_high, m.lc_ci_high)));
    const axis = ticks(lo, hi, 5);
    const min = Math.min(lo, axis[0]), max = Math.max(hi, axis[axis.length - 1]);
    const x = (v) => left + ((v - min) / (max - min || 1)) * (width - left - right);
    const svg = chartSvg(box, width, height, "Model ratings with 95% confidence intervals");
    for (const t of axis) {
      svgEl("line", { class: "grid", x1: x(t), x2: x(t), y1: top, y2: height - bottom }, svg);
      svgEl("text", { x: x(t), y: height - bottom + 16, "text-anchor": "middle" }, svg, String(t));
    }
    svgEl("line", { class: "axis", x1: left, x2: width - right, y1: height - bottom, y2: height - bottom }, svg);
    models.forEach((m, i) => {
      const y = top + rowH * i + rowH / 2;
      const g = svgEl("g", { class: m.provisional ? "row provisional" : "row", "data-testid": "rating-row",
                             "data-model": m.model }, svg);
      const name = m.model.length > 26 ? `${m.model.slice(0, 25)}…` : m.model;
      svgEl("text", { class: "label", x: left - 10, y: y + 4, "text-anchor": "end" }, g,
            name + (m.provisional ? " *" : ""));
      svgEl("line", { class: "whisker", x1: x(m.ci_low), x2: x(m.ci_high), y1: y - 3, y2: y - 3,
                      "data-testid": "rating-whisker" }, g);
      svgEl("circle", { class: "point", cx: x(m.rating), cy: y - 3, r: 5, "data-testid": "rating-point",
                        "data-rating": m.rating }, g);
      svgEl("line", { class: "whisker lc", x1: x(m.lc_ci_low), x2: x(m.lc_ci_high), y1: y + 6, y2: y + 6,
                      "data-testid": "lc-whisker" }, g);
      const cx = x(m.rating_lc), cy = y + 6;
      svgEl("polygon", { class: "point lc", points: `${cx},${cy - 5} ${cx + 5},${cy} ${cx},${cy + 5} ${cx - 5},${cy}`,
                         "data-testid": "lc-point", "data-rating": m.rating_lc }, g);
      svgEl("title", {}, g, `${m.model}: ${Math.round(m.rating)} (95% CI ${Math.round(m.ci_low)}–${Math.round(m.ci_high)}), `
            + `length-controlled ${Math.round(m.rating_lc)}; ${m.battles} battles${m.provisional ? ", provisional" : ""}`);
    });
  }

  // -- win rates between every two models that met (ties count half)

  function rateColour(rate) { // 0: red, 0.5: light grey, 1: blue
    const mix = (a, b, t) => Math.round(a + (b - a) * t);
    const [from, to, t] = rate < 0.5 ? [[217, 83, 79], [238, 238, 238], rate * 2] : [[238, 238, 238], [59, 125, 216], rate * 2 - 1];
    return `rgb(${mix(from[0], to[0], t)}, ${mix(from[1], to[1], t)}, ${mix(from[2], to[2], t)})`;
  }

  function drawMatrix(box, models, pairs) {
    if (!pairs.length) return emptyChart(box, "No battles yet.");
    const names = models.map((m) => m.model);
    const met = new Map(); // "row\u0000col" -> [wins of row, battles]
    for (const p of pairs) {
      met.set(`${p.a}\u0000${p.b}`, [p.a_wins, p.battles]);
      met.set(`${p.b}\u0000${p.a}`, [p.battles - p.a_wins, p.battles]);
    }
    const cell = names.length > 14 ? 24 : 36, left = 190, top = 120;
    const width = left + cell * names.length + 10, height = top + cell * names.length + 10;
    const svg = chartSvg(box, width, height, "Win rate of each model against each other model");
    const short = (n) => (n.length > 22 ? `${n.slice(0, 21)}…` : n);
    names.forEach((name, i) => {
      svgEl("text", { class: "label", x: left - 8, y: top + cell * i + cell / 2 + 4, "text-anchor": "end" }, svg, short(name));
      const cx = left + cell * i + cell / 2;
      svgEl("text", { class: "label", x: cx, y: top - 8, transform: `rotate(-45 ${cx} ${top - 8})` }, svg, short(name));
    });
    names.forEach((row, i) => names.forEach((col, j) => {
      const found = met.get(`${row}\u0000${col}`);
      const at = { x: left + cell * j + 1, y: top + cell * i + 1, width: cell - 2, height: cell - 2 };
      if (!found || i === j) {
        svgEl("rect", { ...at, class: "cell-none", "data-testid": "winrate-empty" }, svg);
        return;
      }
      const [wins, battles] = found;
      const rate = wins / battles;
      const g = svgEl("g", { "data-testid": "winrate-cell", "data-row": row, "data-col": col,
                             "data-rate": rate.toFixed(4), "data-battles": battles }, svg);
      svgEl("rect", { ...at, fill: rateColour(rate), rx: 3 }, g);
      if (cell >= 30) {
        svgEl("text", { class: "cell-text", x: at.x + at.width / 2, y: at.y + at.height / 2 + 4, "text-anchor": "middle" },
              g, `${Math.round(rate * 100)}`);
      }
      svgEl("title", {}, g, `${row} vs ${col}: ${Math.round(rate * 100)}% of ${battles} battle${battles === 1 ? "" : "s"}`);
    }));
  }

  // -- usage: stacked bars per day, a gauge for today's budget

  const USAGE_DAYS = 14;

  function isoDay(date) {
    return date.toISOString().slice(0, 10);
  }

  function daysBetween(from, to) {
    const out = [];
    for (let d = new Date(`${from}T00:00:00Z`); isoDay(d) <= to; d.setUTCDate(d.getUTCDate() + 1)) out.push(isoDay(d));
    return out;
  }

  function drawStacked(box, days, models, colours, value, label, format) {
    const byDay = new Map(days.map((d) => [d, []]));
    for (const r of models.rows) if (byDay.has(r.day)) byDay.get(r.day).push(r);
    const totals = days.map((d) => byDay.get(d).reduce((s, r) => s + value(r), 0));
    if (!models.rows.some((r) => byDay.has(r.day))) return emptyChart(box, "No usage in this range.");
    if (!totals.some((t) => t > 0)) return emptyChart(box, `Nothing to draw: every day's total is ${format(0)}.`);
    const width = 720, height = 230, left = 58, right = 10, top = 10, bottom = 28;
    const peak = Math.max(...totals), axis = ticks(0, peak, 4);
    // the axis ends at a tick at or above the tallest bar (ticks() stops at the last one inside)
    if (axis[axis.length - 1] < peak) axis.push(Number((2 * axis[axis.length - 1] - axis[axis.length - 2]).toPrecision(12)));
    const max = axis[axis.length - 1];
    const y = (v) => top + (1 - v / max) * (height - top - bottom);
    const slot = (width - left - right) / days.length;
    const svg = chartSvg(box, width, height, label);
    for (const t of axis) {
      svgEl("line", { class: "grid", x1: left, x2: width - right, y1: y(t), y2: y(t) }, svg);
      svgEl("text", { x: left - 6, y: y(t) + 4, "text-anchor": "end" }, svg, format(t));
    }
    svgEl("line", { class: "axis", x1: left, x2: width - right, y1: y(0), y2: y(0) }, svg);
    const every = Math.ceil(days.length / 7);
    days.forEach((day, i) => {
      const x0 = left + slot * i + slot * 0.15;
      if (i % every === 0) svgEl("text", { x: x0 + slot * 0.35, y: height - bottom + 16, "text-anchor": "middle" }, svg, day.slice(5));
      let base = 0;
      for (const model of models.order) {
        const r = byDay.get(day).find((row) => row.model === model);
        const v = r ? value(r) : 0;
        if (v <= 0) continue;
        const bar = svgEl("rect", { x: x0, width: slot * 0.7, y: y(base + v), height: Math.max(y(base) - y(base + v), 0.5),
                                    fill: colours.get(model), "data-testid": "usage-bar", "data-day": day,
                                    "data-model": model, "data-value": v }, svg);
        svgEl("title", {}, bar, `${day} · ${model}: ${format(v)}`);
        base += v;
      }
    });
  }

  function drawGauge(box, me) {
    const caps = [me.limits.daily_tokens, me.key ? me.limits.key_daily_tokens : null].filter((c) => c != null);
    if (!caps.length) return emptyChart(box, "No daily token cap: nothing to run out of.");
    meter(box, Math.min(...caps), me.remaining.daily_tokens, "Today's token budget");
  }

  function meter(box, cap, remaining, title) {
    const fraction = Math.max(0, Math.min(1, remaining / cap));
    const width = 240, height = 150, cx = 120, cy = 120, r = 90;
    const svg = chartSvg(box, width, height, `${title}: ${remaining} of ${cap} left`);
    svg.dataset.testid = "gauge";
    svg.dataset.remaining = remaining;
    svg.dataset.cap = cap;
    svg.dataset.fraction = fraction.toFixed(4);
    const point = (f) => [cx - r * Math.cos(Math.PI * f), cy - r * Math.sin(Math.PI * f)];
    const arc = (f) => { const [x, y] = point(f); return `M ${cx - r} ${cy} A ${r} ${r} 0 0 1 ${x.toFixed(2)} ${y.toFixed(2)}`; };
    svgEl("path", { class: "gauge-track", d: arc(1) }, svg);
    if (fraction > 0) svgEl("path", { class: fraction < 0.2 ? "gauge-fill low" : "gauge-fill", d: arc(fraction),
                                      "data-testid": "gauge-fill" }, svg);
    svgEl("text", { class: "gauge-value", x: cx, y: cy - 12, "text-anchor": "middle" }, svg, `${Math.round(fraction * 100)}%`);
    svgEl("text", { x: cx, y: cy + 16, "text-anchor": "middle" }, svg, `${compact(remaining)} of ${compact(cap)} tokens left`);
  }

  // the key in use: its monthly token budget as a gauge; each key the caller sees, with its spend
  function drawKeySpend(keys, me) {
    const own = keys.find((k) => me.key && k.id === me.key.id);
    const cap = own && own.limits ? own.limits.monthly_tokens : null;
    const box = byTestId("month-gauge");
    if (cap == null) emptyChart(box, "No monthly token budget on this key.");
    else meter(box, cap, Math.max(0, cap - own.spend.month.tokens), "This month's token budget");
    const list = byTestId("key-spend");
    list.replaceChildren();
    for (const k of keys) {
      const li = element("li", null, "key-spend-row");
      li.dataset.key = k.id;
      const { today, month, total } = k.spend;
      li.textContent = `${k.name} (${k.prefix}) · today ${compact(today.tokens)} tokens ${dollars(today.cost_usd)}`
        + ` · month ${compact(month.tokens)} ${dollars(month.cost_usd)} · total ${compact(total.tokens)} ${dollars(total.cost_usd)}`;
      list.append(li);
    }
  }

  const usageRange = byTestId("usage-range");
  const usageLegend = byTestId("usage-legend");

  async function loadUsage() {
    if (!state.key) return null;
    const to = isoDay(new Date());
    const start = new Date(`${to}T00:00:00Z`);
    start.setUTCDate(start.getUTCDate() - (USAGE_DAYS - 1));
    const from = isoDay(start);
    const [report, me, keys] = await Promise.all([
      api("GET", `/api/usage?group_by=${encodeURIComponent("day,model")}&from=${from}&to=${to}`),
      api("GET", "/api/me"),
      api("GET", "/api/keys"),
    ]);
    drawKeySpend(keys.keys, me);
    const totals = new Map();
    for (const r of report.rows) totals.set(r.model, (totals.get(r.model) || 0) + r.total_tokens);
    const order = [...totals.keys()].sort((a, b) => totals.get(b) - totals.get(a) || (a < b ? -1 : 1));
    const colours = colourOf(order);
    const days = daysBetween(report.from, report.to);
    usageRange.textContent = `${report.from} – ${report.to} (UTC)`;
    drawGauge(byTestId("budget-gauge"), me);
    drawStacked(byTestId("tokens-chart"), days, { rows: report.rows, order }, colours, (r) => r.total_tokens,
                "Tokens per day by model", compact);
    drawStacked(byTestId("cost-chart"), days, { rows: report.rows, order }, colours, (r) => r.cost_usd,
                "Cost per day by model", dollars);
    usageLegend.replaceChildren();
    for (const model of order) {
      const li = element("li", null, "legend-item");
      li.dataset.model = model;
      const swatch = svgEl("svg", { width: 12, height: 12, "aria-hidden": "true" });
      svgEl("rect", { width: 12, height: 12, rx: 2, fill: colours.get(model) }, swatch);
      li.append(swatch, `${model} · ${compact(totals.get(model))} tokens`);
      usageLegend.append(li);
    }
    document.getElementById("panel-usage").dataset.loaded = report.to;
    return report;
  }

  byTestId("usage-refresh").addEventListener("click", () => loadUsage().catch(() => {}));

  // ---------------------------------------------------------------- leaderboard

  const leaderboardBody = document.getElementById("leaderboard-body");

  const leaderboardNote = byTestId("leaderboard-note");

  async function loadLeaderboard() {
    if (!state.key) return null;
    const board = await api("GET", "/api/leaderboard");
    state.battles = board.battles;
    leaderboardBody.replaceChildren();
    drawRatings(byTestId("ratings-chart"), board.models);
    drawMatrix(byTestId("winrate-matrix"), board.models, board.pairs);
    leaderboardNote.textContent = board.models.length
      ? `${board.battles} battles. * provisional: fewer than ${board.provisional_below} battles. `
        + `Length-controlled: the rating once the voters' taste for longer replies (worth ${board.length_effect} `
        + "points to a reply twice as long as the other) is taken out."
      : "";
    if (!board.models.length) {
      const row = leaderboardBody.insertRow();
      const cell = row.insertCell();
      cell.colSpan = 7;
      cell.className = "muted";
      cell.textContent = "No votes yet.";
      return board;
    }
    board.models.forEach((m, i) => {
      const row = leaderboardBody.insertRow();
      row.dataset.testid = "leaderboard-row";
      row.dataset.model = m.model;
      if (m.provisional) row.dataset.provisional = "true";
      const ci = m.ci_low == null ? "—" : `${Math.round(m.ci_low)} – ${Math.round(m.ci_high)}`;
      const cells = [i + 1, m.provisional ? `${m.model} *` : m.model, Math.round(m.rating), ci,
                     Math.round(m.rating_lc), m.battles, `${Math.round(m.win_rate * 100)}%`];
      for (const value of cells) row.insertCell().textContent = String(value);
    });
    return board;
  }

  // the gateway refits the ratings in the background after a vote and serves the previous
  // result meanwhile: read again until the new battle is counted
  async function leaderboardAfterVote(battlesBefore) {
    for (let i = 0; i < LEADERBOARD_TRIES; i++) {
      const board = await loadLeaderboard();
      if (!board || board.battles > battlesBefore) return;
      await new Promise((r) => setTimeout(r, POLL_MS / 2));
    }
  }

  byTestId("leaderboard-refresh").addEventListener("click", () => loadLeaderboard().catch(() => {}));

  // ---------------------------------------------------------------- start

  // for trying the resume out by hand (and for tests): drop the live stream and resume it; and the
  // HTTP helper the Admin tab (admin.js) calls with the page's key
  window.playground = {
    api,
    dropStream() {
      const current = state.chat || state.arena;
      return current && current.follower ? current.follower.reconnect() : false;
    },
  };

  if (state.key) keyInput.value = state.key;
  checkKey();
})();
