-- handler.remote: jobs that other machines run, fed through a Redis stream
-- that `handler serve` consumes (docs/SCALING.md); and what the producer and
-- the consumer share: the connection to Redis, the entry's format, how an
-- outcome travels.

local handler = require("handler")
local errors = require("handler.errors")

local core = handler._core
local type, error, tostring, tonumber, pairs, ipairs, select, unpack, pcall, setmetatable,
  getmetatable, format, concat, floor, huge, min =
  type, error, tostring, tonumber, pairs, ipairs, select, unpack, pcall, setmetatable,
  getmetatable, string.format, table.concat, math.floor, math.huge, math.min

local M = {}

-- The entry format this module writes and reads. A consumer refuses an
-- entry of another format, another protocol (core.protocol: the worker
-- handshake's) or another LuaJIT build (the bytecode differs).
M.FORMAT = "1"
M.PROTOCOL = tostring(core.protocol)

-- The LuaJIT build, as the worker handshake tells it: the bytecode of a
-- trivial chunk (version, GC64 and FFI flags), here in hex.
do
  local dump = string.dump(loadstring("return"))
  M.BUILD = (dump:gsub(".", function(c) return format("%02x", c:byte()) end))
end

-- Fields of an outcome a consumer adds; a producer's entry never has them.
M.RESERVED = { id = true, ok = true, value = true, attempts = true, consumer = true }

local redis_mod
--- The lua-redis module, or a Lua error naming the package (`what` says who
-- needs it).
function M.need_redis(what, level)
  if redis_mod == nil then
    local ok, r = pcall(require, "redis")
    if not ok or type(r) ~= "table" or type(r.connect) ~= "function" then
      error(what .. ": needs lua-redis (Debian: apt install lua-redis)", (level or 1) + 1)
    end
    redis_mod = r
  end
  return redis_mod
end

--- host, port of "host:port", "host" or "redis://host:port"; nil when bad.
function M.parse_address(s)
  if type(s) ~= "string" then return nil end
  s = s:gsub("^redis://", ""):gsub("/$", "")
  -- An IPv6 address in brackets: "[::1]:6379".
  local host, port = s:match("^%[([^%]]+)%]:(%d+)$")
  if host == nil then host, port = s:match("^([^:]*):(%d+)$") end
  if host == nil then host, port = s, "6379" end
  port = tonumber(port)
  if host == "" or host:find("[%s/]") or (host:find(":") and not s:find("^%[")) or port == nil
     or port < 1 or port > 65535 then
    return nil
  end
  return host, port
end

---------------------------------------------------------------------------
-- A connection to Redis: lua-redis for the socket and the reply parser,
-- commands written as RESP arrays, pipelined when there are several.
-- Failures are values: nil, message; `conn.broken` is set when the
-- connection is unusable (it reconnects on the next call).

local Conn = {}
Conn.__index = Conn

local function resp(args)
  local n = args.n or #args
  local t = { "*" .. n .. "\r\n" }
  for i = 1, n do
    local s = args[i]
    if type(s) == "number" and s == floor(s) and s > -2^53 and s < 2^53 then
      s = format("%d", s)
    else
      s = tostring(s)
    end
    t[#t + 1] = "$" .. #s .. "\r\n" .. s .. "\r\n"
  end
  return concat(t)
end
M.resp = resp

-- lua-redis raises its errors with a position ("redis.lua:330: redis error:
-- ..."): the message alone.
local function clean(e)
  e = tostring(e):gsub("^[^:\n]*%.lua:%d+: ", "")
  return e
end

--- connect(host, port [, password]) -> a connection, connected on first use.
function M.connect(host, port, password)
  local redis = M.need_redis("handler.remote", 2)
  -- A command that sends nothing and reads one reply with lua-redis's parser.
  local read = redis.command("READ", { request = function() end })
  return setmetatable({ host = host, port = port, password = password, _read = read,
    broken = true, where = format("Redis at %s:%d", host, port) }, Conn)
end

function Conn:close()
  if self.client ~= nil then
    pcall(function() self.client.network.socket:close() end)
  end
  self.client = nil
  self.broken = true
end

-- Marks the connection broken and returns nil, the message.
function Conn:fail(e)
  self:close()
  return nil, self.where .. ": " .. clean(e)
end

--- open() -> true | nil, message: connects when not connected.
function Conn:open()
  if not self.broken then return true end
  local redis = redis_mod
  local ok, client = pcall(redis.connect, { host = self.host, port = self.port, timeout = 5 })
  if not ok then return self:fail(client) end
  self.client = client
  self.broken = false
  if self.password ~= nil then
    local r, e = self:call("AUTH", self.password)
    if r == nil then return nil, e end
  end
  return true
end

--- The luasocket socket (for socket.select), or nil when not connected.
function Conn:socket()
  return self.client and self.client.network.socket
end

--- settimeout(seconds): for the replies to come (a blocking read waits longer).
function Conn:settimeout(s)
  if self.client then self.client.network.socket:settimeout(s, "t") end
end

--- send(args...) -> true | nil, message: writes one command, reads nothing.
function Conn:send(...)
  local ok, e = self:open()
  if not ok then return nil, e end
  local sent, err = self.client.network.socket:send(resp({ n = select("#", ...), ... }))
  if not sent then return self:fail(err) end
  return true
end

--- read() -> reply | nil, message, kind: one reply ("redis" as kind for an
-- error reply, which leaves the connection usable).
function Conn:read()
  if self.client == nil then return nil, self.where .. ": not connected", "connection" end
  local ok, r = pcall(self._read, self.client)
  if ok then
    if r == nil then return false end
    return r
  end
  local e = clean(r)
  if e:match("^redis error: ") then return nil, self.where .. ": " .. e:sub(14), "redis" end
  local _, m = self:fail(r)
  return nil, m, "connection"
end

--- call(args...) -> reply | nil, message, kind. A nil reply is false.
function Conn:call(...)
  local ok, e = self:send(...)
  if not ok then return nil, e, "connection" end
  return self:read()
end

--- pipeline(commands) -> replies | nil, message: commands is a list of
-- argument lists, sent at once; replies[i] is the reply or { err = message }
-- for an error reply. On a connection failure, nil, message: some of the
-- commands may have been done.
function Conn:pipeline(cmds)
  local ok, e = self:open()
  if not ok then return nil, e end
  local parts = {}
  for i = 1, #cmds do parts[i] = resp(cmds[i]) end
  local sent, err = self.client.network.socket:send(concat(parts))
  if not sent then return self:fail(err) end
  local replies = {}
  for i = 1, #cmds do
    local r, m, kind = self:read()
    if r == nil then
      if kind ~= "redis" then return nil, m end
      r = { err = m }
    end
    replies[i] = r
  end
  return replies
end

--- A field list (f1, v1, f2, v2, ...) as a table.
function M.fields(list)
  local t = {}
  if type(list) ~= "table" then return t end
  for i = 1, #list - 1, 2 do t[list[i]] = list[i + 1] end
  return t
end

---------------------------------------------------------------------------
-- Outcomes: what a consumer writes, what a producer reads.

-- A plain copy of an error value (no metatable: the encoder would send its
-- __tostring, and a decoder as hostile as the producer's refuses that).
local function plain(err)
  if type(err) ~= "table" then return { type = "ProcessExit", message = tostring(err) } end
  local t = {}
  for k, v in pairs(err) do t[k] = v end
  return t
end

--- encode_outcome(ok, ...) -> the bytes of an outcome's value: the results,
-- or the error value.
function M.encode_outcome(ok, ...)
  if ok then return core.encode(...) end
  return core.encode(plain((...)))
end

--- decode_outcome(ok_field, value) -> true, results... | false, err: as a
-- local job returns. The bytes are hostile input (the decoder's hostile
-- mode: no bytecode, no require).
function M.decode_outcome(ok_field, value)
  local packed = { pcall(core.decode, value or "") }
  if not packed[1] then
    return false, errors.new({ type = "BadOutcome",
      message = "Outcome cannot be decoded: " .. tostring(packed[2]) })
  end
  if ok_field == "1" then return true, unpack(packed, 2, table.maxn(packed)) end
  local err = packed[2]
  if type(err) ~= "table" then
    err = { type = "BadOutcome", message = "Outcome is not an error value: " .. tostring(err) }
  end
  return false, errors.new(err)
end

---------------------------------------------------------------------------
-- The producer: handler.remote{ redis = "host:port", stream = "jobs" }.

local Remote = {}
Remote.__index = Remote

local RemoteJob = {}
RemoteJob.__index = RemoteJob

local function nonneg(v) return type(v) == "number" and v == v and v >= 0 end
local function positive(v) return type(v) == "number" and v == v and v > 0 and v < huge end
local function name(v) return type(v) == "string" and v ~= "" end

local CONFIG = {
  redis = { function(v) return M.parse_address(v) ~= nil end,
    "\"host:port\" of a Redis server" },
  stream = { name, "a non-empty string" },
  results = { name, "a non-empty string" },
  dead = { name, "a non-empty string" },
  password = { name, "a non-empty string" },
}

local JOB_OPTS = {
  max_ms = { nonneg, "a non-negative number of milliseconds" },
  max_cpu_ms = { positive, "a positive number of milliseconds" },
  max_heap_bytes = { positive, "a positive number of bytes" },
  args = { function(v) return type(v) == "table" end, "a table of arguments" },
}

local MAP_OPTS = {
  window = { function(v) return type(v) == "number" and v >= 1 and v == floor(v) and v < huge end,
    "a whole number of items, at least 1" },
  ordered = { function(v) return type(v) == "boolean" end, "a boolean" },
}
for k, v in pairs(JOB_OPTS) do MAP_OPTS[k] = v end
MAP_OPTS.args = nil

local check = handler._check_table

local typename = handler._typename

--- handler.remote(config) -> remote
function M.new(config)
  check("handler.remote", config, CONFIG, 2)
  if config.redis == nil then error("handler.remote: no redis address (redis = \"host:port\")", 2) end
  if config.stream == nil then error("handler.remote: no stream (stream = \"jobs\")", 2) end
  M.need_redis("handler.remote", 2)
  local host, port = M.parse_address(config.redis)
  return setmetatable({
    stream = config.stream,
    results = config.results or config.stream .. ":results",
    dead = config.dead or config.stream .. ":dead",
    _conn = M.connect(host, port, config.password),
    _pending = {},    -- entry id -> job, until its outcome is read
    _last = nil,      -- the last ids read of results and dead
  }, Remote)
end

-- Where the outcomes of this producer's entries start: the streams' last
-- ids before its first entry.
function Remote:_start()
  if self._last ~= nil then return true end
  local conn = self._conn
  local replies, e = conn:pipeline({
    { "XREVRANGE", self.results, "+", "-", "COUNT", 1 },
    { "XREVRANGE", self.dead, "+", "-", "COUNT", 1 },
  })
  if replies == nil then return nil, e end
  local last = {}
  for i = 1, 2 do
    local r = replies[i]
    if r.err then return nil, r.err end
    last[i] = r[1] and r[1][1] or "0-0"
  end
  self._last = last
  return true
end

local function unreachable(msg)
  return errors.new({ type = "RemoteUnavailable", message = msg })
end

-- XADDs an entry with the given fields; a job, or nil, err.
function Remote:_add(fields, opts)
  local ok, e = self:_start()
  if not ok then return nil, unreachable(e) end
  local cmd = { "XADD", self.stream, "*", "format", M.FORMAT, "proto", M.PROTOCOL,
    "build", self._build or M.BUILD }
  for k, v in pairs(fields) do
    cmd[#cmd + 1] = k
    cmd[#cmd + 1] = v
  end
  if opts then
    for _, k in ipairs({ "max_ms", "max_cpu_ms", "max_heap_bytes" }) do
      if opts[k] ~= nil and opts[k] < huge then
        cmd[#cmd + 1] = k
        cmd[#cmd + 1] = format("%.17g", opts[k])
      end
    end
  end
  local id, err = self._conn:call(unpack(cmd))
  if id == nil then return nil, unreachable(err) end
  local job = setmetatable({ id = id, remote = self }, RemoteJob)
  self._pending[id] = job
  return job
end

--- remote:async(fn [, opts]) -> job | nil, err: fn (a closure, with its
-- upvalues, and opts.args) goes into the stream, and a consumer runs it.
function Remote:async(fn, opts)
  if type(fn) ~= "function" then
    error(format("bad argument #1 to 'async' (function expected, got %s)", typename(fn)), 2)
  end
  if opts ~= nil then check("remote:async", opts, JOB_OPTS, 2) end
  local args = opts and opts.args
  local msg
  if args then
    msg = core.encode_job(fn, unpack(args, 1, args.n or #args))
  else
    msg = core.encode_job(fn)
  end
  return self:_add({ fn = msg }, opts)
end

--- remote:submit(value [, opts]) -> job | nil, err: value (data: no
-- functions) is the input of a consumer that serves a script.
function Remote:submit(value, opts)
  if opts ~= nil then check("remote:submit", opts, JOB_OPTS, 2) end
  if opts and opts.args then error("remote:submit: unknown option 'args'", 2) end
  return self:_add({ input = core.encode(value) }, opts)
end

-- Reads outcomes (waiting up to block_ms for one, none: not waiting) and
-- hands those of pending jobs to them. true, or nil, message when Redis
-- cannot be reached.
function Remote:_pump(block_ms)
  local conn = self._conn
  local ok, e = conn:open()
  if not ok then return nil, e end
  local r, err
  if block_ms then
    conn:settimeout(block_ms / 1000 + 10)
    r, err = conn:call("XREAD", "COUNT", 1024, "BLOCK", block_ms, "STREAMS", self.results,
      self.dead, self._last[1], self._last[2])
    conn:settimeout(5)
  else
    r, err = conn:call("XREAD", "COUNT", 1024, "STREAMS", self.results, self.dead,
      self._last[1], self._last[2])
  end
  if r == nil then return nil, err end
  if r == false then return true end
  for _, s in ipairs(r) do
    local k = s[1] == self.results and 1 or 2
    for _, entry in ipairs(s[2] or {}) do
      self._last[k] = entry[1]
      local f = M.fields(entry[2])
      local job = f.id and self._pending[f.id]
      if job then
        self._pending[f.id] = nil
        job._fields = f
        job.dead = k == 2
        job.attempts = tonumber(f.attempts)
      end
    end
  end
  return true
end

-- Waits for outcomes until done() holds; Redis down: tries again, backing
-- off up to 2 s, for as long as it takes.
function Remote:_wait(done)
  local pause = 0.05
  while not done() do
    local ok = self:_pump(2000)
    if ok then
      pause = 0.05
    else
      require("socket").sleep(pause)
      pause = min(pause * 2, 2)
    end
  end
end

--- job:done() -> whether its outcome has been read (it reads what has come,
-- without waiting).
function RemoteJob:done()
  if self._fields == nil and self.remote._last ~= nil then self.remote:_pump() end
  return self._fields ~= nil
end

--- job:await() -> true, results... | false, err, as a local job returns.
function RemoteJob:await()
  if getmetatable(self) ~= RemoteJob then
    error(format("bad argument #1 to 'await' (remote job expected, got %s)", typename(self)), 2)
  end
  local remote = self.remote
  if self._fields == nil then
    remote:_wait(function() return self._fields ~= nil end)
  end
  return M.decode_outcome(self._fields.ok, self._fields.value)
end

--- for i, ok, ... in remote:map(fn, inputs [, opts]) do ... end: fn(item)
-- for each item, each an entry of the stream; as pool:map, ordered by
-- default, at most `window` entries (default 64) waiting at once.
function Remote:map(fn, inputs, opts)
  if type(fn) ~= "function" then
    error(format("bad argument #1 to 'map' (function expected, got %s)", typename(fn)), 2)
  end
  local next_input
  if type(inputs) == "table" then
    local k = 0
    next_input = function() k = k + 1 return inputs[k] end
  elseif type(inputs) == "function" then
    next_input = inputs
  else
    error(format("bad argument #2 to 'map' (array or iterator function expected, got %s)",
      typename(inputs)), 2)
  end
  if opts ~= nil then check("remote:map", opts, MAP_OPTS, 2) end
  opts = opts or {}
  local window, ordered = opts.window or 64, opts.ordered ~= false
  local job_opts = { max_ms = opts.max_ms, max_cpu_ms = opts.max_cpu_ms,
    max_heap_bytes = opts.max_heap_bytes }
  local queue, n, exhausted = {}, 0, false   -- { position, job, err } in input order
  local function fill()
    while not exhausted and #queue < window do
      local item = next_input()
      if item == nil then
        exhausted = true
      else
        n = n + 1
        job_opts.args = { n = 1, item }
        local job, err = self:async(fn, job_opts)
        queue[#queue + 1] = { n, job, err }
      end
    end
  end
  return function()
    fill()
    if queue[1] == nil then return nil end
    local k = 1
    if not ordered then
      self:_wait(function()
        for i = 1, #queue do
          local q = queue[i]
          if q[3] ~= nil or q[2]._fields ~= nil then
            k = i
            return true
          end
        end
        return false
      end)
    end
    local q = table.remove(queue, k)
    if q[2] == nil then return q[1], false, q[3] end
    return q[1], q[2]:await()
  end
end

--- remote:close(): closes its connection (jobs not awaited are forgotten;
-- their entries stay in the stream).
function Remote:close()
  self._conn:close()
  self._pending = {}
end

function Remote:__tostring()
  return format("handler.remote(%s at %s)", self.stream, self._conn.where:sub(10))
end

return M
