// llama-runner dashboard: Vue 3 + Element Plus + uPlot as ES modules (import map in index.html), no bundler.
// Live from the metrics bus over SSE (/api/events): a snapshot first, then every event. No polling.
import { createApp, reactive, ref, computed, onMounted, onBeforeUnmount, watch, markRaw, nextTick } from "vue";
import ElementPlus, { ElMessage } from "element-plus";
import uPlot from "uplot";

const HISTORY = 60; // seconds of tokens/s kept per worker for the live chart
const TAG = { ready: "success", starting: "warning", stopping: "warning", backoff: "danger", fatal: "danger",
              stopped: "info", running: "success" };

// ----------------------------------------------------------------------------- state
const store = reactive({
  workers: {},     // name -> merged worker_state / worker_metrics / status fields
  gateways: {},    // protocol -> gateway_metrics
  processes: {},   // name -> process_state / status
  system: {},
  connected: false,
  lastEvent: 0,
  requests: [],    // latest finished request events (newest first)
  tokenRequired: false,
  token: localStorage.getItem("llama-runner-token") || "",
  apiKeyRequired: false, // the OpenAI port wants an API key: the chat sends the one typed here
  apiKey: localStorage.getItem("llama-runner-api-key") || "",
});
const series = {}; // name -> {t: [], v: [], listeners: Set} (not reactive: charts read it directly)

function seriesOf(name) {
  if (!series[name]) series[name] = markRaw({ t: [], v: [], listeners: new Set() });
  return series[name];
}

function mergeWorker(ev) {
  const cur = store.workers[ev.name] || (store.workers[ev.name] = { name: ev.name });
  for (const [k, v] of Object.entries(ev)) if (k !== "type" && k !== "v") cur[k] = v;
}

const stateSeen = {}; // worker name -> when its last worker_state event came (performance.now())
// Models a reload removed while loaded: they drain, stop, and only then leave the supervisor's list (the status the
// reload's event asks for still has them): their row goes with their "stopped".
const removing = new Set();
const STATE_FIELDS = ["state", "message", "pid", "backend_pid", "restarts"];

function apply(ev) {
  store.lastEvent = Date.now();
  switch (ev.type) {
    case "snapshot":
      for (const w of ev.workers) {
        // (a status asked for before a worker's latest state event is older than it: its state stays the event's;
        // a load's failure message was wiped by the status a reload had asked for a moment before)
        const newer = ev.asked !== undefined && (stateSeen[w.name] || 0) > ev.asked;
        mergeWorker(newer ? Object.fromEntries(Object.entries(w).filter(([k]) => !STATE_FIELDS.includes(k))) : w);
      }
      for (const name of Object.keys(store.workers))
        if (!ev.workers.some((w) => w.name === name)) delete store.workers[name];
      for (const g of ev.gateways) store.gateways[g.protocol] = g;
      for (const p of ev.processes) store.processes[p.name] = { ...(store.processes[p.name] || {}), ...p };
      store.system = ev.system || {};
      break;
    case "worker_state":
      stateSeen[ev.name] = performance.now();
      if (ev.state === "stopped" && removing.has(ev.name)) {
        removing.delete(ev.name);
        delete store.workers[ev.name];
        break;
      }
      mergeWorker(ev);
      if (ev.state !== "ready") { const w = store.workers[ev.name]; w.in_flight = 0; w.queued = 0; }
      break;
    case "worker_metrics": {
      mergeWorker(ev);
      const s = seriesOf(ev.name);
      s.t.push(ev.ts); s.v.push(ev.tokens_per_s || 0);
      if (s.t.length > HISTORY) { s.t.shift(); s.v.shift(); }
      s.listeners.forEach((fn) => fn());
      break;
    }
    case "gateway_metrics": store.gateways[ev.protocol] = ev; break;
    case "process_state": store.processes[ev.name] = { ...(store.processes[ev.name] || {}), ...ev }; break;
    case "system_metrics": store.system = ev; break;
    case "config_reloaded":
      for (const name of ev.removed || []) if (store.workers[name]?.state !== "stopped") removing.add(name);
      for (const name of [...(ev.added || []), ...(ev.changed || [])]) removing.delete(name);
      refreshStatus();
      break;
    case "request":
      if (ev.phase === "finished") { store.requests.unshift(ev); store.requests.length = Math.min(store.requests.length, 20); }
      break;
  }
}

let es = null;
function connect() {
  if (es) es.close();
  es = new EventSource("/api/events");
  es.onopen = () => { store.connected = true; };
  es.onerror = () => { store.connected = false; };  // EventSource reconnects by itself; a new snapshot follows
  es.onmessage = (m) => { try { apply(JSON.parse(m.data)); } catch (e) { console.error(e); } };
}

async function refreshStatus() {
  const asked = performance.now();
  const r = await fetch("/api/status");
  // (type last: the status reply carries its own "type", which must not win)
  if (r.ok) apply({ ...(await r.json()), type: "snapshot", gateways: [], system: store.system, asked });
}

// ----------------------------------------------------------------------------- API
function headers(extra = {}) {
  const h = { ...extra };
  if (store.token) h["X-Llama-Runner-Token"] = store.token;
  return h;
}

async function post(url, body) {
  const r = await fetch(url, { method: "POST", headers: headers(body ? { "Content-Type": "application/json" } : {}),
                               body: body ? JSON.stringify(body) : undefined });
  let doc = {};
  try { doc = await r.json(); } catch (_) { /* not JSON */ }
  if (!r.ok) {
    const msg = doc.message || doc.error?.message || doc.error || `${r.status} ${r.statusText}`;
    throw new Error(r.status === 501 ? `not supported by this supervisor yet: ${msg}` : msg);
  }
  return doc;
}

async function act(name, verb) {
  try {
    const doc = await post(`/api/workers/${encodeURIComponent(name)}/${verb}`);
    ElMessage({ type: "success", message: doc.message || `${verb} ${name}: ok` });
  } catch (e) {
    ElMessage({ type: "error", message: `${verb} ${name}: ${e.message}`, duration: 6000 });
  }
}

async function reloadConfig() {
  try {
    const doc = await post("/api/reload");
    ElMessage({ type: "success", message: doc.message || "config reloaded" });
  } catch (e) {
    ElMessage({ type: "error", message: `reload: ${e.message}`, duration: 8000 });
  }
}

// ----------------------------------------------------------------------------- formatting
const fmt = {
  mb: (b) => (b ? (b / 1048576).toFixed(0) + " MB" : "–"),
  gb: (b) => (b ? (b / 1073741824).toFixed(1) + " GB" : "–"),
  pct: (p) => (p === undefined || p === null ? "–" : p.toFixed(0) + " %"),
  ms: (s) => (s ? (s * 1000).toFixed(0) + " ms" : "–"),
  rate: (r) => (r === undefined ? "–" : r.toFixed(1)),
  dur(s) {
    if (!s) return "–";
    s = Math.floor(s);
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    return h ? `${h}h ${m}m` : m ? `${m}m ${sec}s` : `${sec}s`;
  },
};

// ----------------------------------------------------------------------------- components
const Spark = {
  props: { name: String },
  template: `<div class="spark" ref="el" :data-model="name" data-field="chart"></div>`,
  setup(props) {
    const el = ref(null);
    let plot = null;
    const s = seriesOf(props.name);
    const draw = () => { if (plot) plot.setData([s.t.slice(), s.v.slice()]); };
    onMounted(() => {
      plot = new uPlot({
        width: 140, height: 36, legend: { show: false }, cursor: { show: false }, select: { show: false },
        axes: [{ show: false }, { show: false }], scales: { x: { time: false }, y: { range: (u, min, max) => [0, Math.max(1, max)] } },
        series: [{}, { stroke: "#409eff", fill: "rgba(64,158,255,0.15)", width: 1.5, points: { show: false } }],
      }, [s.t.slice(), s.v.slice()], el.value);
      s.listeners.add(draw);
    });
    onBeforeUnmount(() => { s.listeners.delete(draw); if (plot) plot.destroy(); });
    return { el };
  },
};

const LogDrawer = {
  props: { name: String, modelValue: Boolean },
  emits: ["update:modelValue"],
  template: `
  <el-drawer :model-value="modelValue" @update:model-value="$emit('update:modelValue', $event)" size="60%"
             :title="'Log of ' + name + ' (live)'" @opened="open" @closed="close" destroy-on-close>
    <div class="logbox" ref="box" data-field="log"><div v-for="(l, i) in lines" :key="i" :class="'src-' + l.source">{{ l.line }}</div></div>
  </el-drawer>`,
  setup(props) {
    const lines = ref([]);
    const box = ref(null);
    let src = null;
    function open() {
      lines.value = [];
      const q = store.token ? `?token=${encodeURIComponent(store.token)}` : "";
      src = new EventSource(`/api/logs/${encodeURIComponent(props.name)}${q}`);
      src.onmessage = async (m) => {
        lines.value.push(JSON.parse(m.data));
        if (lines.value.length > 2000) lines.value.splice(0, lines.value.length - 2000);
        const b = box.value;
        const atEnd = b && b.scrollHeight - b.scrollTop - b.clientHeight < 40;
        await nextTick();
        if (b && atEnd) b.scrollTop = b.scrollHeight;
      };
    }
    function close() { if (src) src.close(); src = null; }
    onBeforeUnmount(close);
    return { lines, box, open, close };
  },
};

const WorkersView = {
  components: { Spark, LogDrawer },
  template: `
  <div>
    <div class="section-title">Models</div>
    <el-table :data="workers" row-key="name" size="small" border empty-text="no models configured" data-table="workers">
      <el-table-column label="model" min-width="150">
        <template #default="{ row }"><b :data-model="row.name" data-field="name">{{ row.name }}</b>
          <div class="muted row-msg" v-if="row.message" :title="row.message" :data-model="row.name" data-field="message">{{ row.message }}</div></template>
      </el-table-column>
      <el-table-column label="state" width="100">
        <template #default="{ row }"><el-tag :type="tag(row.state)" effect="dark" size="small" :data-model="row.name"
          data-field="state" :data-state="row.state">{{ row.state }}</el-tag></template>
      </el-table-column>
      <el-table-column label="pid" width="80"><template #default="{ row }"><span class="num" :data-model="row.name" data-field="pid">{{ live(row) ? row.pid : '–' }}</span></template></el-table-column>
      <el-table-column label="uptime" width="85"><template #default="{ row }"><span class="num">{{ live(row) ? fmt.dur(row.uptime_s) : '–' }}</span></template></el-table-column>
      <el-table-column label="CPU" width="70"><template #default="{ row }"><span class="num">{{ live(row) ? fmt.pct(row.cpu_percent) : '–' }}</span></template></el-table-column>
      <el-table-column label="RSS" width="85"><template #default="{ row }"><span class="num">{{ live(row) ? fmt.mb(row.rss_bytes) : '–' }}</span></template></el-table-column>
      <el-table-column label="in flight" width="75"><template #default="{ row }"><span class="num" :data-model="row.name" data-field="in_flight">{{ row.in_flight ?? 0 }}</span></template></el-table-column>
      <el-table-column label="queue" width="65"><template #default="{ row }"><span class="num">{{ row.queued ?? 0 }}</span></template></el-table-column>
      <el-table-column label="tokens/s" width="210">
        <template #default="{ row }"><div style="display:flex;align-items:center;gap:6px">
          <span class="num" style="width:44px" :data-model="row.name" data-field="tps">{{ fmt.rate(row.tokens_per_s) }}</span><Spark :name="row.name" /></div></template>
      </el-table-column>
      <el-table-column label="TTFT last / p50" width="120"><template #default="{ row }"><span class="num">{{ fmt.ms(row.ttft_last_s) }} / {{ fmt.ms(row.ttft_p50_s) }}</span></template></el-table-column>
      <el-table-column label="tokens" width="80"><template #default="{ row }"><span class="num" :data-model="row.name" data-field="tokens">{{ row.tokens_total ?? 0 }}</span></template></el-table-column>
      <el-table-column label="restarts" width="75"><template #default="{ row }"><span class="num" :data-model="row.name" data-field="restarts">{{ row.restarts ?? 0 }}</span></template></el-table-column>
      <el-table-column label="actions" fixed="right" width="330">
        <template #default="{ row }">
          <el-button-group>
            <el-button size="small" :data-model="row.name" data-action="start" :disabled="['ready', 'starting', 'stopping'].includes(row.state)" @click="act(row.name, 'start')">start</el-button>
            <el-button size="small" :data-model="row.name" data-action="stop" :disabled="row.state === 'stopped'" @click="act(row.name, 'stop')">stop</el-button>
            <el-button size="small" type="warning" :data-model="row.name" data-action="restart" @click="act(row.name, 'restart')">restart</el-button>
            <el-button size="small" :data-model="row.name" data-action="unload" :disabled="row.state === 'stopped'" @click="act(row.name, 'unload')">unload</el-button>
            <el-button size="small" type="info" plain :data-model="row.name" data-action="logs" @click="showLog(row.name)">log</el-button>
          </el-button-group>
        </template>
      </el-table-column>
    </el-table>

    <div class="section-title">Gateways and processes</div>
    <el-table :data="procs" size="small" border data-table="processes">
      <el-table-column prop="name" label="process" min-width="150" />
      <el-table-column label="state" width="100"><template #default="{ row }"><el-tag :type="tag(row.state)" size="small">{{ row.state }}</el-tag></template></el-table-column>
      <el-table-column prop="pid" label="pid" width="80" />
      <el-table-column prop="port" label="port" width="80" />
      <el-table-column label="requests/s" width="95"><template #default="{ row }"><span class="num">{{ row.gw ? fmt.rate(row.gw.requests_per_s) : '–' }}</span></template></el-table-column>
      <el-table-column label="requests" width="90"><template #default="{ row }"><span class="num" :data-process="row.name" data-field="requests">{{ row.gw ? row.gw.requests_total : '–' }}</span></template></el-table-column>
      <el-table-column label="errors 5xx / 4xx" width="120"><template #default="{ row }"><span class="num">{{ row.gw ? row.gw.errors_total + ' / ' + row.gw.client_errors_total : '–' }}</span></template></el-table-column>
      <el-table-column label="open streams" width="105"><template #default="{ row }"><span class="num">{{ row.gw ? row.gw.open_streams : '–' }}</span></template></el-table-column>
      <el-table-column label="RSS" width="85"><template #default="{ row }"><span class="num">{{ row.gw ? fmt.mb(row.gw.rss_bytes) : '–' }}</span></template></el-table-column>
      <el-table-column prop="restarts" label="restarts" width="80" />
    </el-table>

    <div class="section-title">Latest requests</div>
    <el-table :data="store.requests" size="small" border empty-text="none yet" data-table="requests">
      <el-table-column prop="model" label="model" min-width="120" />
      <el-table-column prop="path" label="path" min-width="160" />
      <el-table-column prop="status" label="status" width="70" />
      <el-table-column prop="outcome" label="outcome" width="90" />
      <el-table-column prop="tokens" label="tokens" width="70" />
      <el-table-column label="TTFT" width="80"><template #default="{ row }">{{ fmt.ms(row.ttft_s) }}</template></el-table-column>
      <el-table-column label="duration" width="90"><template #default="{ row }">{{ fmt.ms(row.duration_s) }}</template></el-table-column>
      <el-table-column label="queued" width="80"><template #default="{ row }">{{ fmt.ms(row.queued_s) }}</template></el-table-column>
    </el-table>
    <LogDrawer v-if="logName" :name="logName" v-model="logOpen" />
  </div>`,
  setup() {
    const workers = computed(() => Object.values(store.workers).sort((a, b) => a.name.localeCompare(b.name)));
    const procs = computed(() => Object.values(store.processes).sort((a, b) => a.name.localeCompare(b.name))
      .map((p) => ({ ...p, gw: p.name.startsWith("gateway-") ? store.gateways[p.name.slice(8)] : null })));
    const logName = ref("");
    const logOpen = ref(false);
    function showLog(name) { logName.value = name; logOpen.value = true; }
    const live = (w) => ["ready", "starting", "stopping"].includes(w.state);
    return { store, workers, procs, fmt, act, tag: (s) => TAG[s] || "info", live, logName, logOpen, showLog };
  },
};

const ModelsView = {
  template: `
  <div>
    <div class="section-title">Configured models <span class="muted" style="font-weight:normal">{{ configDir }}</span>
      <el-button size="small" style="margin-left:12px" :loading="scanning" @click="scan" data-action="discover">Discover models</el-button></div>
    <el-card v-if="found" shadow="never" style="margin-bottom:12px" data-field="discovered">
      <div v-if="!found.found.length">No new models under <code>{{ found.models_root }}</code>.</div>
      <div v-else>
        <p>Found under <code>{{ found.models_root }}</code>, not in the config yet:</p>
        <el-table :data="found.found" size="small" border>
          <el-table-column prop="name" label="name" min-width="160" />
          <el-table-column prop="kind" label="type" width="90" />
          <el-table-column prop="path" label="path (in the models root)" min-width="260" />
        </el-table>
        <el-button type="primary" size="small" style="margin-top:8px" @click="addFound" data-action="discover-add">
          Add {{ found.found.length }} to models_config.json and reload</el-button>
      </div>
    </el-card>
    <el-alert v-if="error" type="error" :title="error" show-icon :closable="false" />
    <el-table :data="rows" size="small" border data-table="models">
      <el-table-column label="model" min-width="140"><template #default="{ row }"><b>{{ row.name }}</b>
        <el-tag v-if="row.default" size="small" style="margin-left:6px">default</el-tag>
        <el-tag v-if="row.preload" size="small" type="info" style="margin-left:6px">preload</el-tag></template></el-table-column>
      <el-table-column prop="type" label="type" width="80" />
      <el-table-column label="loaded" width="110"><template #default="{ row }">
        <el-tag :type="tag(state(row))" size="small" :data-model="row.name" data-field="model-state">{{ state(row) }}</el-tag></template></el-table-column>
      <el-table-column label="file" min-width="260"><template #default="{ row }"><span :class="row.exists ? '' : 'muted'">{{ row.model_path }}</span>
        <span class="muted"> {{ row.exists ? fmt.mb(row.size_bytes) : '(missing)' }}</span></template></el-table-column>
      <el-table-column label="aliases" min-width="100"><template #default="{ row }">{{ row.aliases.join(', ') || '–' }}</template></el-table-column>
      <el-table-column label="ctx" width="70"><template #default="{ row }">{{ row.parameters.ctx_size ?? '–' }}</template></el-table-column>
      <el-table-column label="threads" width="70"><template #default="{ row }">{{ row.parameters.threads }}</template></el-table-column>
      <el-table-column label="parallel" width="70"><template #default="{ row }">{{ row.parameters.parallel }}</template></el-table-column>
      <el-table-column label="idle TTL" width="80"><template #default="{ row }">{{ row.idle_ttl_s < 0 ? 'never' : row.idle_ttl_s + ' s' }}</template></el-table-column>
      <el-table-column label="extra args" min-width="140"><template #default="{ row }"><code>{{ row.parameters.extra_args.join(' ') }}</code></template></el-table-column>
    </el-table>
  </div>`,
  setup() {
    const rows = ref([]);
    const error = ref("");
    const configDir = ref("");
    async function load() {
      const r = await fetch("/api/models");
      const doc = await r.json();
      if (!r.ok) { error.value = doc.error || r.statusText; return; }
      error.value = ""; rows.value = doc.models; configDir.value = doc.config_dir;
    }
    onMounted(load);
    watch(() => Object.keys(store.workers).join(","), load);  // models added or removed by a reload
    const found = ref(null);
    const scanning = ref(false);
    async function scan() {
      scanning.value = true;
      try {
        const r = await fetch("/api/discover");
        const doc = await r.json();
        if (!r.ok) throw new Error(doc.error || r.statusText);
        found.value = doc;
      } catch (e) { ElMessage({ type: "error", message: `discovery: ${e.message}` }); }
      finally { scanning.value = false; }
    }
    async function addFound() {
      try {
        const doc = await post("/api/discover");
        const rel = doc.reload || {};
        ElMessage({ type: rel.type === "error" ? "warning" : "success",
                    message: `added ${doc.found.length} model(s)` + (rel.message ? `; reload: ${rel.message}` : "") });
        found.value = null;
        load();
      } catch (e) { ElMessage({ type: "error", message: `discovery: ${e.message}`, duration: 8000 }); }
    }
    const state = (row) => store.workers[row.name]?.state || row.state;
    return { rows, error, configDir, fmt, state, tag: (s) => TAG[s] || "info", found, scanning, scan, addFound };
  },
};

const ChatView = {
  template: `
  <div style="max-width: 900px">
    <div class="section-title">Try a model</div>
    <div class="chat-log" ref="logEl" data-field="chat-log">
      <div v-for="(m, i) in messages" :key="i" :class="['msg', m.role]"><b>{{ m.role }}:</b> {{ m.content }}<span v-if="m.error" class="err"> [error: {{ m.error }}]</span></div>
      <div v-if="!messages.length" class="muted">Messages go through the OpenAI gateway (streamed).</div>
    </div>
    <div style="display:flex; gap:8px; align-items:flex-start">
      <el-select v-model="model" placeholder="model" style="width: 200px" data-field="chat-model">
        <el-option v-for="n in names" :key="n" :label="n" :value="n" />
      </el-select>
      <el-input v-model="text" type="textarea" :rows="2" placeholder="Say something… (Ctrl+Enter sends)"
                @keydown.ctrl.enter="send" data-field="chat-input" />
      <el-button type="primary" :loading="busy" @click="send" data-action="chat-send">Send</el-button>
      <el-button @click="messages = []">Clear</el-button>
    </div>
  </div>`,
  setup() {
    // the models that chat (from the config: embedding-only ones are left out), the default model first chosen
    const catalog = ref(null);
    async function loadCatalog() {
      try { const r = await fetch("/api/models"); if (r.ok) catalog.value = (await r.json()).models; } catch (_) { /* offline */ }
    }
    onMounted(loadCatalog);
    watch(() => Object.keys(store.workers).join(","), loadCatalog);  // models added or removed by a reload
    const names = computed(() => (catalog.value
      ? catalog.value.filter((m) => m.chat).map((m) => m.name)
      : Object.values(store.workers).filter((w) => w.kind !== "whisper").map((w) => w.name)).sort());
    const model = ref("");
    watch([names, catalog], () => {
      if (model.value && names.value.includes(model.value)) return;
      const preferred = (catalog.value || []).find((m) => m.default && m.chat);
      model.value = preferred ? preferred.name : (names.value[0] || "");
    }, { immediate: true });
    const text = ref("");
    const busy = ref(false);
    const messages = ref([]);
    const logEl = ref(null);
    async function send() {
      if (!text.value.trim() || !model.value || busy.value) return;
      messages.value.push({ role: "user", content: text.value });
      text.value = "";
      // (an answer that ended in an error is no part of the conversation: the model read our error notes)
      const history = messages.value.filter((m) => !m.error).map(({ role, content }) => ({ role, content }));
      const answer = reactive({ role: "assistant", content: "", error: "" });
      messages.value.push(answer);
      busy.value = true;
      try {
        const extra = { "Content-Type": "application/json" };
        if (store.apiKey) extra["X-Llama-Runner-Api-Key"] = store.apiKey;
        const r = await fetch("/api/chat", { method: "POST", headers: headers(extra),
                                             body: JSON.stringify({ model: model.value, messages: history }) });
        if (!r.ok) {
          let msg = r.statusText;
          try { const d = await r.json(); msg = d.error?.message || d.error || msg; } catch (_) { /* keep */ }
          throw new Error(msg);
        }
        const reader = r.body.getReader();
        const dec = new TextDecoder();
        let buf = "";
        for (;;) {
          const { done, value } = await reader.read();
          if (done) break;
          buf += dec.decode(value, { stream: true });
          let i;
          while ((i = buf.indexOf("\n\n")) >= 0) {
            const ev = buf.slice(0, i); buf = buf.slice(i + 2);
            for (const line of ev.split("\n")) {
              if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
              const d = JSON.parse(line.slice(6));
              const piece = d.choices?.[0]?.delta?.content;
              if (piece) answer.content += piece;
              if (d.error) throw new Error(d.error.message || "error");
            }
          }
          await nextTick();
          if (logEl.value) logEl.value.scrollTop = logEl.value.scrollHeight;
        }
      } catch (e) {
        answer.error = e.message;
        ElMessage({ type: "error", message: e.message });
      } finally {
        busy.value = false;
      }
    }
    return { names, model, text, busy, messages, send, logEl };
  },
};

const App = {
  components: { WorkersView, ModelsView, ChatView },
  template: `
  <div>
    <div class="topbar">
      <h1>llama-runner</h1>
      <div class="sys" data-field="system">
        <span>CPU</span><el-progress :percentage="Math.round(store.system.cpu_percent || 0)" :stroke-width="10" />
        <span>Memory</span><el-progress :percentage="Math.round(store.system.memory_percent || 0)" :stroke-width="10" status="success" />
        <span class="muted" style="color:#c0c4cc">{{ fmt.gb(store.system.memory_used_bytes) }} / {{ fmt.gb(store.system.memory_total_bytes) }}
          · load {{ (store.system.load_avg || []).map(x => x.toFixed(2)).join(' ') }}</span>
      </div>
      <div class="spacer"></div>
      <el-input v-if="store.tokenRequired" v-model="store.token" size="small" style="width: 200px" placeholder="dashboard token"
                type="password" show-password data-field="token" />
      <el-input v-if="store.apiKeyRequired" v-model="store.apiKey" size="small" style="width: 200px" placeholder="API key (chat)"
                type="password" show-password data-field="api-key" />
      <el-button size="small" @click="reloadConfig" data-action="reload">Reload config</el-button>
      <span :class="['live', store.connected ? 'on' : 'off']" data-field="live">{{ store.connected ? 'live' : 'reconnecting' }}</span>
    </div>
    <main>
      <el-tabs v-model="tab">
        <el-tab-pane label="Workers" name="workers"><WorkersView /></el-tab-pane>
        <el-tab-pane label="Models" name="models" lazy><ModelsView /></el-tab-pane>
        <el-tab-pane label="Chat" name="chat" lazy><ChatView /></el-tab-pane>
      </el-tabs>
    </main>
  </div>`,
  setup() {
    const tab = ref(location.hash.slice(1) || "workers");
    watch(tab, (t) => { history.replaceState(null, "", "#" + t); });
    watch(() => store.token, (t) => localStorage.setItem("llama-runner-token", t));
    watch(() => store.apiKey, (k) => localStorage.setItem("llama-runner-api-key", k));
    onMounted(async () => {
      connect();
      try { const i = await (await fetch("/api/info")).json(); store.tokenRequired = i.token_required; store.apiKeyRequired = !!i.api_key_required; } catch (_) { /* offline */ }
    });
    return { store, tab, fmt, reloadConfig };
  },
};

const app = createApp(App);
app.use(ElementPlus);
app.mount("#app");
window.__llamaRunner = store; // for debugging and the browser tests
