// The playground's Admin tab, for an admin key: model health (GET /api/admin/models), the
// configuration reload (POST /api/admin/reload), API keys (create with limits, revoke: /api/keys)
// and the audit trail (GET /api/admin/audit, in pages). Plain JavaScript; HTTP goes through app.js's
// helper, with the page's key. Everything shown is set as text, never as HTML.
"use strict";

(() => {
  const AUDIT_PAGE = 20;
  const byTestId = (id) => document.querySelector(`[data-testid="${id}"]`);

  // app.js's helper (the page's key; an error carries the answer's status and message)
  const api = (method, path, body) => window.playground.api(method, path, body);

  function cell(text, className) {
    const td = document.createElement("td");
    td.textContent = text === null || text === undefined ? "–" : String(text);
    if (className) td.className = className;
    return td;
  }

  function when(iso) {
    return iso ? iso.replace("T", " ").slice(0, 19) : null;
  }

  function ms(value) {
    return value === null ? null : `${value.toFixed(value < 10 ? 1 : 0)} ms`;
  }

  const status = byTestId("admin-status");

  // ---------------------------------------------------------------- models

  async function loadModels() {
    const body = await api("GET", "/api/admin/models");
    const rows = byTestId("admin-models").tBodies[0];
    rows.replaceChildren();
    for (const m of body.models) {
      const tr = document.createElement("tr");
      tr.dataset.model = m.name;
      const w = m.last_5_minutes;
      const name = cell(m.name + (m.default ? " (default)" : ""));
      const circuit = document.createElement("td");
      const badge = document.createElement("span");
      badge.className = "circuit";
      badge.dataset.state = m.circuit;
      badge.textContent = m.circuit.replace("_", "-");
      circuit.append(badge);
      tr.append(name, cell(m.provider), cell(m.enabled ? "yes" : "no"), circuit, cell(w.requests, "num"),
        cell(w.error_rate === null ? null : `${(w.error_rate * 100).toFixed(1)}%`, "num"),
        cell(ms(w.ttft_p50_ms), "num"), cell(ms(w.ttft_p95_ms), "num"), cell(w.fallbacks, "num"));
      rows.append(tr);
    }
    byTestId("admin-models-scope").textContent =
      `(last ${Math.round(body.window_s / 60)} minutes, this instance ${String(body.instance_id).slice(0, 8)})`;
  }

  byTestId("admin-reload").addEventListener("click", async () => {
    const out = byTestId("admin-reload-status");
    out.textContent = "Reloading…";
    try {
      const r = await api("POST", "/api/admin/reload");
      const parts = [];
      for (const what of ["models", "providers"]) {
        for (const verb of ["added", "removed", "changed"]) {
          if (r[what][verb].length) parts.push(`${what} ${verb}: ${r[what][verb].join(", ")}`);
        }
      }
      if (r.restart_required.length) parts.push(`Needs a restart: ${r.restart_required.join(", ")}`);
      out.textContent = `Reloaded. ${parts.join("; ") || "Nothing changed."}`;
    } catch (e) {
      out.textContent = `Not reloaded: ${e.message}`;
    }
    await Promise.all([loadModels(), loadAudit(true)]).catch(() => {});
  });

  // ---------------------------------------------------------------- keys

  function limitsText(limits) {
    if (!limits) return "none";
    return Object.entries(limits).map(([k, v]) => `${k} ${Array.isArray(v) ? v.join(",") : v}`).join("; ");
  }

  // a key's spend (GET /api/keys rows' `spend`: its descendants' included), tokens and dollars
  function spendText(spend) {
    if (!spend) return null;
    const one = (s) => `${s.tokens} tokens $${Number(s.cost_usd.toFixed(4))}`;
    return `${one(spend.today)} · ${one(spend.month)} · ${one(spend.total)}`;
  }

  async function loadKeys() {
    const body = await api("GET", "/api/keys?all=true");
    const rows = byTestId("admin-keys").tBodies[0];
    rows.replaceChildren();
    for (const k of body.keys) {
      const tr = document.createElement("tr");
      tr.dataset.keyId = k.id;
      if (k.revoked_at) tr.className = "revoked";
      const action = document.createElement("td");
      if (!k.revoked_at) {
        const revoke = document.createElement("button");
        revoke.type = "button";
        revoke.className = "danger";
        revoke.textContent = "Revoke";
        revoke.setAttribute("aria-label", `Revoke ${k.name}`);
        revoke.addEventListener("click", async () => {
          revoke.disabled = true;
          try {
            await api("DELETE", `/api/keys/${k.id}`);
            status.textContent = `Revoked ${k.name}.`;
          } catch (e) {
            status.textContent = `Not revoked: ${e.message}`;
          }
          await Promise.all([loadKeys(), loadAudit(true)]).catch(() => {});
        });
        action.append(revoke);
      }
      tr.append(cell(k.name), cell(k.prefix), cell(k.scopes.join(", ")), cell(limitsText(k.limits)),
        cell(when(k.created_at)), cell(when(k.last_used_at)), cell(k.revoked_at ? "revoked" : "active"),
        cell(spendText(k.spend)), action);
      rows.append(tr);
    }
  }

  byTestId("admin-key-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const form = e.currentTarget;
    const body = {
      name: form.elements.name.value,
      scopes: Array.from(form.querySelectorAll('input[name="scope"]:checked'), (c) => c.value),
    };
    const limits = {};
    for (const name of ["daily_tokens", "requests_per_minute"]) {
      if (form.elements[name].value) limits[name] = Number.parseInt(form.elements[name].value, 10);
    }
    if (form.elements.daily_cost_usd.value) limits.daily_cost_usd = Number(form.elements.daily_cost_usd.value);
    if (Object.keys(limits).length) body.limits = limits;
    const shown = byTestId("admin-new-key");
    try {
      const created = await api("POST", "/api/keys", body);
      shown.textContent = `New key for ${created.name} (shown once, copy it now): ${created.key}`;
      shown.hidden = false;
      form.reset();
      status.textContent = "";
    } catch (err) {
      shown.hidden = true;
      status.textContent = `Not created: ${err.message}`;
    }
    await Promise.all([loadKeys(), loadAudit(true)]).catch(() => {});
  });

  // ---------------------------------------------------------------- audit trail

  let auditCursor = null;

  async function loadAudit(fromStart) {
    const query = `?limit=${AUDIT_PAGE}` + (!fromStart && auditCursor ? `&cursor=${auditCursor}` : "");
    const body = await api("GET", `/api/admin/audit${query}`);
    const rows = byTestId("admin-audit").tBodies[0];
    if (fromStart) rows.replaceChildren();
    for (const entry of body.entries) {
      const tr = document.createElement("tr");
      tr.dataset.kind = entry.kind;
      const a = entry.actor;
      const actor = a.signal ? `signal ${a.signal}` : `${a.key_name || "signed-in user"}${a.key_prefix ? ` (${a.key_prefix}…)` : ""}`;
      tr.append(cell(when(entry.at)), cell(entry.kind), cell(actor), cell(entry.status, "num"), cell(entry.request_id));
      rows.append(tr);
    }
    auditCursor = body.next_cursor;
    byTestId("admin-audit-more").hidden = !auditCursor;
  }

  byTestId("admin-audit-more").addEventListener("click", () => {
    loadAudit(false).catch((e) => { status.textContent = `Audit not loaded: ${e.message}`; });
  });

  // ---------------------------------------------------------------- the tab

  async function loadAll() {
    status.textContent = "Loading…";
    try {
      await Promise.all([loadModels(), loadKeys(), loadAudit(true)]);
      status.textContent = "";
    } catch (e) {
      status.textContent = e.status === 403 ? "(this tab needs a key with the admin scope)" : `(not loaded: ${e.message})`;
    }
  }

  // app.js selects the tab (a click, or the arrow keys) and focuses it
  byTestId("tab-admin").addEventListener("focus", loadAll);
  byTestId("admin-refresh").addEventListener("click", loadAll);
})();
