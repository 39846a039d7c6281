-- handler.serve: the command line's `handler serve`: a consumer of a Redis
-- stream, through a consumer group, that runs each entry as a job of a local
-- pool and writes its outcome to a results stream (docs/SCALING.md).
--
-- One loop, never busy: it waits in socket.select on handler.fd() (a job
-- ended, a deadline passed), the reader connection's socket (an
-- XREADGROUP BLOCK is outstanding whenever the window has room) and a
-- signalfd (SIGTERM, SIGINT, SIGUSR1), with a timeout only for its own
-- timers (claiming, the heartbeat of held entries, backoff, the stats key).
-- A second connection writes: outcomes, claims, heartbeats.

local ffi = require("ffi")
local handler = require("handler")
local cli = require("handler.cli")
local remote = require("handler.remote")
local waitlist = require("handler.waitlist")

local core = handler._core
local format, concat, tonumber, tostring, type, pairs, ipairs, pcall, unpack, select =
  string.format, table.concat, tonumber, tostring, type, pairs, ipairs, pcall, unpack, select
local min, max, huge, floor = math.min, math.max, math.huge, math.floor
local usage, now = cli.usage, cli.now

local M = {}

local USAGE = [[
usage: handler serve [SCRIPT.lua] --stream NAME [options]

Reads the stream through a consumer group and runs each entry as a job of
a local pool: a closure a producer sent (handler.remote), or, with
SCRIPT.lua (a function or { map = function, init = function }, as for
handler map), the entry's input. Each outcome goes to the results stream,
keyed by the entry's id; the entry is acknowledged once it is written.

  --redis HOST:PORT       the Redis server (default 127.0.0.1:6379)
  --stream NAME           the stream of entries (required)
  --group NAME            the consumer group (default handler; made when missing)
  --consumer NAME         this consumer's name (default HOST-PID)
  --results NAME          where outcomes go (default STREAM:results)
  --dead NAME             where entries go that failed --retries times (default STREAM:dead)
  --results-maxlen N      trim the results stream to about N entries
  -j N, --jobs N          worker processes (default: the number of CPUs)
  --window N              entries held at once, at most (default 2 x jobs)
  --max-ms MS             wall-clock limit per entry (default 60000; an entry may ask for less)
  --max-cpu-ms MS         CPU time limit per entry (an entry may ask for less)
  --max-heap BYTES        heap limit per entry (default 10M; an entry may ask for less)
  --retries N             runs again an entry that timed out or crashed, or whose
                          consumer died, N times before it is a dead letter (default 2)
  --visibility-ms MS      an entry held this long by a consumer that stopped answering
                          is claimed by another (default 30000)
  --sandbox               entries run in the strict sandbox (workers serve many entries)
  --sandbox-each          each entry in a sandboxed worker process of its own (the
                          "syscalls" profile): for streams untrusted parties write
  --stats-key KEY         write this consumer's counters to the Redis hash KEY every second
                          (and on SIGUSR1)
  --progress, --no-progress   a progress line on standard error (default: on a terminal)

SIGTERM or SIGINT: reads nothing more, finishes what it holds, writes and
acknowledges its outcomes, exits 0 (a second one: exits at once; what it held
is claimed by others). SIGUSR1: a stats line on standard error.
]]

pcall(ffi.cdef, [[
int hd_serve_signalfd(int fd, const void *mask, int flags) __asm__("signalfd");
long hd_serve_read(int fd, void *buf, unsigned long n) __asm__("read");
int hd_serve_close(int fd) __asm__("close");
int hd_serve_getpid(void) __asm__("getpid");
int hd_serve_gethostname(char *name, unsigned long len) __asm__("gethostname");
]])
local C = ffi.C
local SIGINT, SIGUSR1, SIGTERM = 2, 10, 15
local SFD_NONBLOCK, SFD_CLOEXEC = 0x800, 0x80000

-- Writes an outcome, and acknowledges the entry, only if the entry is
-- still pending in the group: whoever writes first wins, and a consumer
-- that ran the same entry again (it was claimed from it) writes nothing.
-- KEYS: the stream, the results or dead-letter stream. ARGV: the group,
-- the entry id, the MAXLEN ("" for none), then the outcome's fields.
local OUTCOME_SCRIPT = [[
if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1) == 0 then return 0 end
local add = { KEYS[2] }
if ARGV[3] ~= '' then add[2] = 'MAXLEN'; add[3] = '~'; add[4] = ARGV[3] end
add[#add + 1] = '*'
for i = 4, #ARGV do add[#add + 1] = ARGV[i] end
redis.call('XADD', unpack(add))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return 1
]]

--- parse(argv) -> options; raises a Usage error.
function M.parse(argv)
  local o = { redis = "127.0.0.1:6379", group = "handler", retries = 2, visibility_ms = 30000,
    max_ms = 60000, max_heap = 10 * 2^20 }
  cli.each_arg(argv, 2, function(a, value)
    if a == "--redis" then o.redis = value(a)
    elseif a == "--stream" then o.stream = value(a)
    elseif a == "--group" then o.group = value(a)
    elseif a == "--consumer" then o.consumer = value(a)
    elseif a == "--results" then o.results = value(a)
    elseif a == "--dead" then o.dead = value(a)
    elseif a == "--results-maxlen" then o.maxlen = cli.count_of(value(a), a, 1)
    elseif a == "-j" or a == "--jobs" then o.jobs = cli.count_of(value(a), a, 1)
    elseif a == "--window" then o.window = cli.count_of(value(a), a, 1)
    elseif a == "--max-ms" then o.max_ms = cli.ms_of(value(a), a)
    elseif a == "--max-cpu-ms" then o.max_cpu_ms = cli.ms_of(value(a), a)
    elseif a == "--max-heap" then o.max_heap = cli.bytes_of(value(a), a)
    elseif a == "--retries" then o.retries = cli.count_of(value(a), a)
    elseif a == "--visibility-ms" then o.visibility_ms = cli.ms_of(value(a), a)
    elseif a == "--stats-key" then o.stats_key = value(a)
    elseif a == "--sandbox" then o.sandbox = true
    elseif a == "--sandbox-each" then o.sandbox_each = true
    elseif a == "--progress" then o.progress = true
    elseif a == "--no-progress" then o.progress = false
    elseif a == "-h" or a == "--help" then o.help = true
    elseif a:sub(1, 1) == "-" then usage("unknown option %s", a)
    elseif o.script == nil then o.script = a
    else usage("one SCRIPT.lua at most, got %s too", a) end
  end)
  if o.help then return o end
  if o.stream == nil or o.stream == "" then usage("no --stream NAME given") end
  if remote.parse_address(o.redis) == nil then
    usage("--redis: expected HOST:PORT, got %s", tostring(o.redis))
  end
  for _, k in ipairs({ "group", "consumer", "results", "dead", "stats_key" }) do
    if o[k] == "" then usage("--%s: must not be empty", (k:gsub("_", "-"))) end
  end
  if o.sandbox and o.sandbox_each then usage("--sandbox and --sandbox-each: choose one") end
  return o
end

local function default_consumer()
  local buf = ffi.new("char[256]")
  local host = C.hd_serve_gethostname(buf, 255) == 0 and ffi.string(buf) or "host"
  return format("%s-%d", host, C.hd_serve_getpid())
end

-- Whether a failure is one that running again may cure: pool:map's rule
-- (a time limit, a crash, a lost worker).
local retryable = require("handler.map").retryable

local function pack(...)
  return { n = select("#", ...), ... }
end

--- main(argv, out, errs) -> exit status
function M.main(argv, out, errs)
  local ok, o = pcall(M.parse, argv)
  if ok and o.help then
    out:write(USAGE)
    return 0
  end
  if not ok then return cli.exit_status("handler serve", errs, false, o) end
  return cli.exit_status("handler serve", errs, pcall(M.run, o, out, errs))
end

--- run(options, out, errs) -> exit status
function M.run(o, out, errs)
  local rok, rerr = pcall(remote.need_redis, "handler serve")
  if not rok then usage("%s", (tostring(rerr):gsub("^handler serve: ", ""))) end
  local user_map, user_init
  if o.script then user_map, user_init = cli.load_script(o.script) end
  local host, port = remote.parse_address(o.redis)
  local stream, group = o.stream, o.group
  local consumer = o.consumer or default_consumer()
  local results = o.results or stream .. ":results"
  local dead_stream = o.dead or stream .. ":dead"
  local maxlen = o.maxlen and tostring(o.maxlen) or ""
  local jobs = o.jobs or cli.cpus()
  local window = o.window or 2 * jobs
  local retries, visibility = o.retries, o.visibility_ms

  local init, script_fn
  if user_map then
    init = function()
      HANDLER_SERVE_MAP = user_map
      if user_init then user_init() end
    end
    script_fn = function(input) return HANDLER_SERVE_MAP(input) end
  end
  -- An entry's closure is bytecode, which can break the Lua isolation of a
  -- worker that serves many entries: --sandbox-each gives each entry a
  -- jailed process of its own.
  local pool = handler.pool{ max_workers = jobs, init = init, idle_ms = 60000,
    sandbox = o.sandbox_each and "syscalls" or o.sandbox and "strict" or nil }

  -- Signals wait in a signalfd: the loop's select wakes for them.
  local _, set = cli.block_signals({ SIGINT, SIGTERM, SIGUSR1 })
  local sfd = C.hd_serve_signalfd(-1, set, SFD_NONBLOCK + SFD_CLOEXEC)
  if sfd < 0 then error("handler serve: signalfd failed", 0) end
  local sig_obj = { getfd = function() return sfd end }
  local sigbuf = ffi.new("uint32_t[32]")
  local hfd_obj = { getfd = function() return handler.fd() end }

  local rd = remote.connect(host, port)   -- XREADGROUP BLOCK, nothing else
  local wr = remote.connect(host, port)   -- everything else

  local c = { read = 0, claimed = 0, ok = 0, failed = 0, dead = 0, refused = 0, retried = 0,
    handed_back = 0, duplicates = 0, reconnects = 0 }
  local t0 = now()
  local held, nheld = {}, 0          -- entry id -> entry, until its outcome is written
  local outbox = {}                  -- entries whose outcome waits to be written
  local script_sha                   -- OUTCOME_SCRIPT's, once loaded
  local ended = {}                   -- entries whose job ended, to collect
  local stopping, quit = false, false
  local rd_outstanding, rd_count, rd_sent_at, rd_id = false, 0, 0, nil
  local rd_retry_at, wr_retry_at, rd_pause, wr_pause = 0, 0, 0.05, 0.05
  local next_claim, next_beat, next_stats, claim_cursor = 0, 0, 0, "0-0"
  local down_since, said_down = nil, false
  local progress = o.progress
  if progress == nil then progress = cli.isatty(2) end
  local last_shown = 0
  local BLOCK_MS = 10000

  local function done_count() return c.ok + c.failed + c.dead + c.refused end

  local function stats_line()
    local t = now() - t0
    return format("%d done (%d ok, %d failed, %d dead, %d refused), %d held, %d retried, "
      .. "%d claimed, %d handed back, %d duplicates, %d reconnects, %.0f/s, %.1f s",
      done_count(), c.ok, c.failed, c.dead, c.refused, nheld, c.retried, c.claimed,
      c.handed_back, c.duplicates, c.reconnects, done_count() / max(t, 1e-6), t)
  end

  local stale = false   -- counters changed since the progress line was written
  local function show(final)
    if not progress then return end
    local t = now()
    if not final and (not stale or t - last_shown < 0.2) then return end
    last_shown, stale = t, false
    errs:write("\r", stats_line(), final and "\n" or "  ")
    errs:flush()
  end

  local function note_down(e)
    if down_since == nil then down_since = now() end
    if not said_down then
      said_down = true
      errs:write(format("handler serve: %s; trying again\n", tostring(e)))
      errs:flush()
    end
  end

  local function note_up()
    if down_since ~= nil then
      down_since = nil
      c.reconnects = c.reconnects + 1
      if said_down then
        errs:write("handler serve: connected again\n")
        errs:flush()
      end
      said_down = false
    end
  end

  -- Outcomes -------------------------------------------------------------

  local function outcome(e, kind, ok, value)
    e.kind, e.ok, e.value = kind, ok, value
    e.job = nil
    outbox[#outbox + 1] = e
  end

  local function refuse(e, why)
    c.refused = c.refused + 1
    e.refused = true
    outcome(e, "r", false, remote.encode_outcome(false, {
      type = "BadEntry", reason = why, message = format("Refused entry %s: %s", e.id, why) }))
  end

  local function to_dead(e, err)
    e.dead = true
    outcome(e, "d", false, remote.encode_outcome(false, err))
  end

  local function outcome_cmd(e)
    local target = e.kind == "d" and dead_stream or results
    local cmd = { "EVALSHA", script_sha, 2, stream, target, group, e.id, maxlen,
      "id", e.id, "ok", e.ok and "1" or "0", "value", e.value,
      "attempts", e.prev + e.tries, "consumer", consumer }
    if e.kind == "d" then
      for k, v in pairs(e.fields) do
        if not remote.RESERVED[k] then
          cmd[#cmd + 1] = k
          cmd[#cmd + 1] = v
        end
      end
    end
    return cmd
  end

  local function forget(e)
    if held[e.id] == e then
      held[e.id] = nil
      nheld = nheld - 1
    end
  end

  -- Writes the outcomes waiting; those not written (Redis unreachable) stay.
  local function flush()
    if outbox[1] == nil or now() < wr_retry_at then return end
    if script_sha == nil then
      -- Loaded once per connection's server: a restarted Redis has lost it
      -- (NOSCRIPT below), and it is loaded again.
      local sha, e = wr:call("SCRIPT", "LOAD", OUTCOME_SCRIPT)
      if sha == nil then
        note_down(e)
        wr_retry_at = now() + wr_pause
        wr_pause = min(wr_pause * 2, 2)
        return
      end
      script_sha = sha
    end
    local cmds = {}
    for i = 1, #outbox do cmds[i] = outcome_cmd(outbox[i]) end
    local replies, e = wr:pipeline(cmds)
    if replies == nil then
      note_down(e)
      wr_retry_at = now() + wr_pause
      wr_pause = min(wr_pause * 2, 2)
      return
    end
    note_up()
    wr_pause = 0.05
    local keep = {}
    for i = 1, #outbox do
      local x, r = outbox[i], replies[i]
      if type(r) == "table" and r.err then
        keep[#keep + 1] = x
        if r.err:find("NOSCRIPT", 1, true) then
          script_sha = nil
        else
          -- Another error reply (the stream is of another type, out of
          -- memory): kept and tried again.
          note_down(r.err)
          wr_retry_at = now() + 1
        end
      else
        if r == 0 then c.duplicates = c.duplicates + 1
        elseif x.refused then -- counted when refused
        elseif x.dead then c.dead = c.dead + 1
        elseif x.ok then c.ok = c.ok + 1
        else c.failed = c.failed + 1 end
        forget(x)
      end
    end
    outbox = keep
    stale = true
    show(false)
  end

  -- Jobs -------------------------------------------------------------------

  local function limits(f)
    local opts = { max_ms = o.max_ms, max_heap_bytes = o.max_heap, max_cpu_ms = o.max_cpu_ms,
      pool_timeout = huge }
    for _, k in ipairs({ "max_ms", "max_cpu_ms", "max_heap_bytes" }) do
      local v = f[k]
      if v ~= nil then
        local n = tonumber(v)
        if n == nil or n ~= n or n < 0 or (k ~= "max_ms" and (n == 0 or n == huge)) then
          return nil, format("%s is not a %s number: %s", k,
            k == "max_ms" and "non-negative" or "positive", v:sub(1, 40))
        end
        opts[k] = min(n, opts[k] or huge)
      end
    end
    return opts
  end

  local function watch(e)
    local function waiter() ended[#ended + 1] = e end
    if waitlist.add(waiter, e.job._ud) then waiter() end
  end

  local function run(e)
    local jok, job, err
    if script_fn then
      jok, job, err = pcall(pool.async, pool, script_fn, { args = { n = 1, e.input },
        max_ms = e.opts.max_ms, max_heap_bytes = e.opts.max_heap_bytes,
        max_cpu_ms = e.opts.max_cpu_ms, pool_timeout = huge })
    else
      jok, job, err = pcall(pool._async_encoded, pool, e.fields.fn, e.opts)
    end
    if not jok then return refuse(e, tostring(job)) end
    if job == nil then return outcome(e, "r", false, remote.encode_outcome(false, err)) end
    e.job = job
    watch(e)
  end

  -- An entry delivered `deliveries` times (this one included).
  local function start(id, list, deliveries)
    if held[id] ~= nil then return end   -- claimed back while still held here
    local f = remote.fields(list)
    local e = { id = id, fields = f, prev = deliveries - 1, tries = 0 }
    held[id] = e
    nheld = nheld + 1
    if f.format ~= remote.FORMAT then
      return refuse(e, format("entry speaks format %s, this consumer speaks %s",
        tostring(f.format), remote.FORMAT))
    elseif f.proto ~= remote.PROTOCOL then
      return refuse(e, format("entry speaks protocol %s, this consumer speaks %s",
        tostring(f.proto), remote.PROTOCOL))
    elseif f.build ~= remote.BUILD then
      return refuse(e, "entry was encoded by another LuaJIT (its bytecode differs)")
    end
    local opts, why = limits(f)
    if opts == nil then return refuse(e, why) end
    e.opts = opts
    if script_fn then
      if f.input == nil then
        return refuse(e, "entry has no input field (this consumer serves a script)")
      end
      local dok, v = pcall(core.decode, f.input)
      if not dok then return refuse(e, "input: " .. tostring(v)) end
      e.input = v
    elseif f.fn == nil then
      return refuse(e, "entry has no fn field (this consumer runs closures)")
    end
    if e.prev > retries then
      return to_dead(e, { type = "ProcessExit", cause = "lost",
        reason = format("delivered %d times without an outcome", deliveries),
        message = format("Process exited with delivered %d times without an outcome",
          deliveries) })
    end
    run(e)
  end

  local function collect(e)
    if e.job == nil or not e.job:done() then return end
    local r = pack(e.job:await())
    e.tries = e.tries + 1
    e.job = nil
    if not r[1] and retryable(r[2]) then
      if stopping then
        -- Handed back: left pending, for another consumer to claim.
        c.handed_back = c.handed_back + 1
        forget(e)
        return
      end
      if e.prev + e.tries <= retries then
        c.retried = c.retried + 1
        return run(e)
      end
      return to_dead(e, r[2])
    end
    outcome(e, "r", r[1], remote.encode_outcome(unpack(r, 1, r.n)))
  end

  local function collect_ended()
    while ended[1] ~= nil do
      local list = ended
      ended = {}
      for i = 1, #list do
        local e = list[i]
        if e.job ~= nil then
          if e.job:done() then collect(e) else watch(e) end
        end
      end
    end
  end

  -- Redis: reading, claiming, the heartbeat --------------------------------

  local function room()
    return window - nheld - (rd_outstanding and rd_count or 0)
  end

  local function read_entries(reply)
    if type(reply) ~= "table" then return end
    for _, s in ipairs(reply) do
      for _, entry in ipairs(s[2] or {}) do
        c.read = c.read + 1
        start(entry[1], entry[2], 1)
      end
    end
  end

  local function send_read()
    local n = room()
    if n <= 0 or rd_outstanding or now() < rd_retry_at then return end
    local okc, e = rd:open()
    if okc and rd_id == nil then
      local id
      id, e = rd:call("CLIENT", "ID")
      rd_id = id
      okc = id ~= nil
    end
    if okc then
      rd:settimeout(BLOCK_MS / 1000 + 10)
      okc, e = rd:send("XREADGROUP", "GROUP", group, consumer, "COUNT", n, "BLOCK", BLOCK_MS,
        "STREAMS", stream, ">")
    end
    if not okc then
      rd_id = nil
      note_down(e)
      rd_retry_at = now() + rd_pause
      rd_pause = min(rd_pause * 2, 2)
      return
    end
    rd_outstanding, rd_count, rd_sent_at = true, n, now()
  end

  local function read_reply()
    local r, e, kind = rd:read()
    rd_outstanding = false
    if r == nil then
      if kind ~= "redis" then rd_id = nil end
      note_down(e)
      rd_retry_at = now() + rd_pause
      rd_pause = min(rd_pause * 2, 2)
      -- NOGROUP: the group went away (the stream was deleted): made again.
      if kind == "redis" and tostring(e):find("NOGROUP") then
        wr:call("XGROUP", "CREATE", stream, group, "0", "MKSTREAM")
      end
      return
    end
    rd_pause = 0.05
    note_up()
    read_entries(r)
  end

  -- Claims the entries of consumers that stopped answering: idle longer
  -- than the visibility timeout. Each one's delivery count says how many
  -- attempts it had.
  local function claim()
    local n = room()
    if n <= 0 then return end
    local r, e = wr:call("XAUTOCLAIM", stream, group, consumer, floor(visibility), claim_cursor,
      "COUNT", n)
    if r == nil then
      note_down(e)
      return
    end
    claim_cursor = r[1] or "0-0"
    local got = {}
    for _, entry in ipairs(r[2] or {}) do
      if entry[1] and held[entry[1]] == nil then got[#got + 1] = entry end
    end
    if got[1] == nil then return end
    local cmds = {}
    for i, entry in ipairs(got) do
      cmds[i] = { "XPENDING", stream, group, entry[1], entry[1], 1 }
    end
    local pend, e2 = wr:pipeline(cmds)
    if pend == nil then
      note_down(e2)
      return
    end
    for i, entry in ipairs(got) do
      local p = pend[i]
      local deliveries = type(p) == "table" and p[1] and tonumber(p[1][4]) or 2
      c.claimed = c.claimed + 1
      start(entry[1], entry[2], deliveries)
    end
    -- More may be waiting: look again soon.
    if claim_cursor ~= "0-0" then next_claim = now() end
  end

  -- Resets the idle time of the entries held (running, or with an outcome
  -- not yet written), so that no other consumer claims them meanwhile.
  local function heartbeat()
    local ids = {}
    for id in pairs(held) do ids[#ids + 1] = id end
    if ids[1] == nil then return end
    local cmd = { "XCLAIM", stream, group, consumer, 0 }
    for i = 1, #ids do cmd[#cmd + 1] = ids[i] end
    cmd[#cmd + 1] = "JUSTID"
    local r, e = wr:call(unpack(cmd))
    if r == nil then note_down(e) end
  end

  local function write_stats()
    if o.stats_key == nil then return end
    wr:call("HSET", o.stats_key, consumer, stats_line())
  end

  local function signals()
    while true do
      local n = tonumber(C.hd_serve_read(sfd, sigbuf, 128))
      if n == nil or n < 128 then return end
      local sig = sigbuf[0]
      if sig == SIGUSR1 then
        -- The hash too: whoever asked sees the same figures there.
        write_stats()
        errs:write(format("%shandler serve: %s: %s\n", progress and "\n" or "", consumer,
          stats_line()))
        errs:flush()
      elseif stopping then
        quit = true
      else
        stopping = true
      end
    end
  end

  -- Start: the group (from the stream's beginning, when it is new). ----------

  local function make_group()
    local pause = 0.05
    while true do
      local r, e, kind = wr:call("XGROUP", "CREATE", stream, group, "0", "MKSTREAM")
      if r ~= nil or (kind == "redis" and tostring(e):find("BUSYGROUP")) then
        note_up()
        return true
      end
      if kind == "redis" then
        errs:write(format("handler serve: cannot make group %s of %s: %s\n", group, stream, e))
        return false
      end
      note_down(e)
      signals()
      if stopping then return true end
      require("socket").select({ sig_obj }, nil, pause)
      pause = min(pause * 2, 2)
    end
  end

  if not make_group() then
    pool:close()
    C.hd_serve_close(sfd)
    return 1
  end
  c.reconnects = 0
  errs:write(format("handler serve: consumer %s of group %s reads %s at %s:%d, %d workers\n",
    consumer, group, stream, host, port, jobs))
  errs:flush()

  local socket_select = require("socket").select
  local unblocked = false          -- stopping: the outstanding read was told to return
  local claim_unblocked = false    -- claiming: the same

  while true do
    signals()
    if quit then break end
    waitlist.step()
    collect_ended()
    flush()
    local t = now()
    if not stopping then
      if t >= next_beat and nheld > 0 then
        heartbeat()
        next_beat = t + visibility / 3000
      end
      if t >= next_claim and window - nheld > 0 then
        if rd_outstanding then
          -- The outstanding read holds the window's room: it is told to
          -- return (with what it may have been given), then claiming goes
          -- first. Once per claim interval when idle.
          if not claim_unblocked then
            claim_unblocked = rd_id ~= nil and wr:call("CLIENT", "UNBLOCK", rd_id) ~= nil
            -- Not told (Redis away): tried at the next interval.
            if not claim_unblocked then next_claim = t + max(visibility / 2000, 0.05) end
          end
        else
          next_claim = t + max(visibility / 2000, 0.05)
          claim_unblocked = false
          claim()
        end
      elseif t >= next_claim then
        next_claim = t + max(visibility / 2000, 0.05)
      end
      send_read()
    elseif rd_outstanding and not unblocked and rd_id ~= nil then
      -- Stopping: the outstanding read returns at once, with what it may
      -- already have been given.
      local r = wr:call("CLIENT", "UNBLOCK", rd_id)
      unblocked = r ~= nil
      if r == nil then rd_outstanding = false end
    end
    if o.stats_key and t >= next_stats then
      write_stats()
      next_stats = t + 1
    end
    if stopping and nheld == 0 and outbox[1] == nil and not rd_outstanding then break end
    if rd_outstanding and t - rd_sent_at > BLOCK_MS / 1000 + 10 then
      -- No reply long after the block: the connection is dead.
      rd:close()
      rd_outstanding, rd_id = false, nil
    end

    -- Wait for something to do.
    local deadline = huge
    if not stopping then
      -- (Waiting for the read that was told to return: its reply wakes us.)
      if not claim_unblocked then deadline = min(deadline, next_claim) end
      if nheld > 0 then deadline = min(deadline, next_beat) end
      if not rd_outstanding and room() > 0 then deadline = min(deadline, rd_retry_at) end
    end
    if outbox[1] ~= nil then deadline = min(deadline, wr_retry_at) end
    if o.stats_key then deadline = min(deadline, next_stats) end
    -- The progress line catches up with the last outcomes when all is quiet.
    if stale and progress then deadline = min(deadline, last_shown + 0.2) end
    if ended[1] ~= nil then deadline = 0 end
    local wait = nil   -- nothing timed: until something is ready
    if deadline < huge then wait = max(0, deadline - now()) end
    local watch_set = { hfd_obj, sig_obj }
    local sock = rd_outstanding and rd:socket()
    if sock then watch_set[3] = sock end
    local ready = socket_select(watch_set, nil, wait)
    if sock then
      for _, x in ipairs(ready or {}) do
        if x == sock then
          read_reply()
          break
        end
      end
    end
    show(false)
  end

  -- Stopped: what is held (after a second signal) stays pending, for others.
  for _, e in pairs(held) do
    if e.job ~= nil then pool:kill_by_ref(e.job) end
    c.handed_back = c.handed_back + 1
  end
  show(true)
  write_stats()
  errs:write(format("handler serve: consumer %s stopped: %s\n", consumer, stats_line()))
  errs:flush()
  pool:close()
  rd:close()
  wr:close()
  C.hd_serve_close(sfd)
  return 0
end

return M
