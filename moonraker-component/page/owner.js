// The printer owner's page. Everything it shows comes from Moonraker's API
// with the visitor's own credentials: a trusted client needs none, anyone
// else logs in (/access/login) and the token stays in this tab only. Data is
// written with textContent, never as HTML: file names are chosen by others.
'use strict';

const BASE = location.pathname.replace(/\/server\/encrypted_print\/page\/?$/, '');
const $ = (id) => document.getElementById(id);
let token = sessionStorage.getItem('encprint-token');
let refreshToken = sessionStorage.getItem('encprint-refresh');
let renewing = null;
let recipientShown = false;

class AuthError extends Error {}

function setTokens(access, refresh) {
  token = access;
  refreshToken = refresh;
  for (const [key, value] of [['encprint-token', access], ['encprint-refresh', refresh]]) {
    if (value) sessionStorage.setItem(key, value); else sessionStorage.removeItem(key);
  }
}

// Moonraker's access tokens last an hour; its refresh token renews them.
async function renew() {
  try {
    const res = await fetch(BASE + '/access/refresh_jwt', {
      method: 'POST', headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ refresh_token: refreshToken }),
    });
    if (!res.ok) return false;
    setTokens((await res.json()).result.token, refreshToken);
    return true;
  } catch (e) {
    return false;
  }
}

async function api(path, options = {}, retry = true) {
  const headers = Object.assign({}, options.headers);
  if (token) headers.Authorization = 'Bearer ' + token;
  const res = await fetch(BASE + path, Object.assign({}, options, { headers }));
  if (res.status === 401) {
    if (retry && refreshToken) {
      renewing = renewing || renew().finally(() => { renewing = null; });
      if (await renewing) return api(path, options, false);
    }
    throw new AuthError('login needed');
  }
  if (!res.ok) {
    let msg = res.status + ' ' + res.statusText;
    try { msg = (await res.json()).error.message; } catch (e) { /* not JSON */ }
    throw new Error(msg);
  }
  return res;
}
const json = async (path) => (await (await api(path)).json()).result;

// -- formatting --

function when(secs) {
  return secs ? new Date(secs * 1000).toLocaleString([], {
    year: 'numeric', month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit',
  }) : '';
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function cell(row, label, main, sub, cls) {
  const td = el('td', null, cls);
  td.dataset.label = label;
  const box = el('div', main);  // one grid item beside the label at phone width
  if (sub) box.append(el('small', sub));
  td.append(box);
  row.append(td);
  return td;
}

function shortKey(key) {
  return key && key.length > 24 ? key.slice(0, 17) + '…' + key.slice(-6) : key;
}

const RESULTS = {
  printing: 'printing', starting: 'starting', complete: 'complete',
  cancelled: 'cancelled', error: 'error', replaced: 'replaced by another print',
  reset: 'reset', klippy_disconnect: 'Klipper disconnected',
  klippy_shutdown: 'Klipper shut down', moonraker_shutdown: 'Moonraker stopped',
};

// -- rendering --

function renderStatus(st) {
  const list = $('warnings');
  list.replaceChildren();
  const problems = Object.values(st.problems || {});
  for (const msg of problems) list.append(el('li', msg));
  if (!problems.length) {
    list.append(el('li', st.ready ? 'Ready: encrypted files can be printed.'
      : 'Waiting for Klipper…', 'ok'));
  }
  const prog = st.decrypting;
  $('progress').hidden = !prog;
  if (prog) {
    const pct = prog.total ? Math.floor(prog.done * 100 / prog.total) : 0;
    $('progress').textContent = `Decrypting ${prog.filename}: ${pct}%`;
  }
}

function renderRecipient(recipient) {
  $('recipient').textContent = recipient;
  recipientShown = true;
}

async function loadQR() {
  try {
    const blob = await (await api('/server/encrypted_print/recipient/qr')).blob();
    $('qr').src = URL.createObjectURL(blob);
    $('qr').hidden = false;
  } catch (e) {
    if (e instanceof AuthError) throw e;
    $('qr').hidden = true;
    $('copied').textContent = 'No QR code: ' + e.message;
  }
}

function renderFiles(data) {
  const body = $('files').tBodies[0];
  body.replaceChildren();
  $('no-files').hidden = data.files.length > 0;
  $('files').hidden = data.files.length === 0;
  for (const f of data.files) {
    const row = document.createElement('tr');
    row.dataset.filename = f.filename;
    cell(row, 'File', f.filename, data.printing === f.filename ? 'printing now' : '');
    if (!f.publisher) cell(row, 'Publisher', 'not signed', '', 'muted');
    else if (f.signature_valid) cell(row, 'Publisher', shortKey(f.publisher), 'signature valid');
    else cell(row, 'Publisher', shortKey(f.publisher), 'signature INVALID', 'bad');
    const from = f.not_before ? 'from ' + when(f.not_before) : '';
    const until = f.not_after ? 'until ' + when(f.not_after) : '';
    cell(row, 'Valid', from || until ? [from, until].filter(Boolean).join(' ') : 'any time');
    const left = f.prints_left === null ? 'unlimited' : `${f.prints_left} of ${f.max_prints}`;
    cell(row, 'Prints left', left, `${f.prints_used} used`, 'num prints-left');
    if (f.printable) cell(row, 'Can print?', 'yes', '', 'good');
    else cell(row, 'Can print?', 'no', f.reason, 'bad');
    body.append(row);
  }
}

function renderJobs(jobs) {
  const body = $('jobs').tBodies[0];
  body.replaceChildren();
  $('no-jobs').hidden = jobs.length > 0;
  $('jobs').hidden = jobs.length === 0;
  for (const j of jobs.slice(0, 100)) {
    const row = document.createElement('tr');
    row.dataset.filename = j.filename;
    cell(row, 'Started', when(j.start_time), j.end_time ? 'ended ' + when(j.end_time) : '');
    cell(row, 'File', j.filename, j.publisher ? 'signed by ' + shortKey(j.publisher) : '');
    cell(row, 'Print', j.print_number ? '#' + j.print_number : '', '', 'num');
    const res = j.result || '';
    cell(row, 'Result', RESULTS[res] || res, '',
      res === 'complete' ? 'good' : (res === 'printing' ? 'note' : ''));
    const trusted = !j.user || j.user === '_TRUSTED_USER_';
    cell(row, 'User', trusted ? 'trusted client' : j.user, '', trusted ? 'muted' : '');
    const ms = j.decrypt_ms;
    cell(row, 'Decrypt', ms === undefined || ms === null ? ''
      : (ms < 1000 ? Math.round(ms) + ' ms' : (ms / 1000).toFixed(1) + ' s'), '', 'num');
    body.append(row);
  }
}

// -- loading --

async function refresh() {
  try {
    const [st, files, jobs] = await Promise.all([
      json('/server/encrypted_print/status'),
      json('/server/encrypted_print/files'),
      json('/server/encrypted_print/jobs'),
    ]);
    renderStatus(st);
    renderFiles(files);
    renderJobs(jobs.jobs);
    if (!recipientShown) {
      renderRecipient((await json('/server/encrypted_print/recipient')).recipient);
      await loadQR();
    }
    $('login').hidden = true;
    $('content').hidden = false;
    document.body.dataset.loaded = String(Date.now());
  } catch (e) {
    if (e instanceof AuthError) return needLogin();
    showError('Cannot load: ' + e.message);
  }
}

let soon = [];
function refreshSoon() {
  // The job record is written a moment after print_stats moves: look twice.
  soon.forEach(clearTimeout);
  soon = [setTimeout(refresh, 150), setTimeout(refresh, 1500)];
}

function showError(msg) {
  $('error').textContent = msg;
  $('error').hidden = !msg;
}

function needLogin() {
  setTokens(null, null);
  $('content').hidden = true;
  $('login').hidden = false;
  setLive(false, 'Not logged in');
  $('user').focus();
}

$('login').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  $('login-error').textContent = '';
  try {
    const res = await fetch(BASE + '/access/login', {
      method: 'POST', headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ username: $('user').value, password: $('password').value,
        source: 'moonraker' }),
    });
    const body = await res.json();
    if (!res.ok) throw new Error(body.error ? body.error.message : res.statusText);
    setTokens(body.result.token, body.result.refresh_token);
    $('password').value = '';
    await refresh();
    connect();
  } catch (e) {
    $('login-error').textContent = 'Login failed: ' + e.message;
  }
});

function selectRecipient() {
  const range = document.createRange();
  range.selectNodeContents($('recipient'));
  const sel = window.getSelection();
  sel.removeAllRanges();
  sel.addRange(range);
}

$('copy').addEventListener('click', async () => {
  const text = $('recipient').textContent;
  let ok = false;
  if (navigator.clipboard && window.isSecureContext) {
    try { await navigator.clipboard.writeText(text); ok = true; } catch (e) { /* below */ }
  }
  if (!ok) {  // plain http on the LAN has no clipboard API
    selectRecipient();
    ok = document.execCommand('copy');
  }
  $('copied').textContent = ok ? 'Copied.' : 'Selected: press Ctrl+C (or ⌘C) to copy.';
});
$('recipient').addEventListener('focus', selectRecipient);

// -- live updates: Moonraker's websocket (JSON-RPC) --

let ws = null;
let nextId = 1;

function setLive(on, text) {
  $('live').className = 'live ' + (on ? 'on' : 'off');
  $('live').textContent = text;
}

function rpc(method, params) {
  ws.send(JSON.stringify({ jsonrpc: '2.0', method, params, id: nextId++ }));
}

function subscribe() {
  rpc('printer.objects.subscribe', { objects: { print_stats: ['state', 'filename'] } });
}

function showPrinter(ps) {
  if (!ps || !ps.state) return;
  const state = ps.state;
  $('printer').textContent = 'Printer: ' + state + (ps.filename ? ' (' + ps.filename + ')' : '');
}

let printStats = {};
function onMessage(msg) {
  if (msg.result && msg.result.status && msg.result.status.print_stats) {
    printStats = Object.assign(printStats, msg.result.status.print_stats);
    showPrinter(printStats);
    return;
  }
  switch (msg.method) {
    case 'notify_status_update': {
      const ps = msg.params[0].print_stats;
      if (ps) {
        printStats = Object.assign(printStats, ps);
        showPrinter(printStats);
        if ('state' in ps || 'filename' in ps) refreshSoon();
      }
      break;
    }
    case 'notify_encrypted_print_progress': {
      const p = msg.params[0];
      const pct = p.total ? Math.floor(p.done * 100 / p.total) : 0;
      $('progress').textContent = `Decrypting ${p.filename}: ${pct}%`;
      $('progress').hidden = false;
      break;
    }
    case 'notify_encrypted_print_error':
      showError(msg.params[0].message);
      refreshSoon();
      break;
    case 'notify_klippy_ready':
      subscribe();
      refreshSoon();
      break;
    case 'notify_filelist_changed':
    case 'notify_history_changed':
    case 'notify_klippy_disconnected':
    case 'notify_klippy_shutdown':
      refreshSoon();
      break;
    default:
  }
}

function connect() {
  if (ws) ws.close();
  const proto = location.protocol === 'https:' ? 'wss://' : 'ws://';
  const sock = new WebSocket(proto + location.host + BASE + '/websocket');
  ws = sock;
  sock.onopen = () => {
    const params = { client_name: 'encprint-owner-page', version: '1', type: 'web',
      url: location.href };
    if (token) params.access_token = token;
    rpc('server.connection.identify', params);
    subscribe();
    setLive(true, 'Live');
    refreshSoon();
  };
  sock.onmessage = (ev) => onMessage(JSON.parse(ev.data));
  sock.onclose = () => {
    if (ws !== sock) return;
    setLive(false, 'Offline, reconnecting…');
    setTimeout(connect, 3000);
  };
}

refresh().then(() => { if (!$('content').hidden) connect(); });
