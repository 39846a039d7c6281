-- spec/support/redis.lua: a real redis-server started by a spec, and the
-- `handler serve` consumers it runs against it; both always stopped. How a
-- spec uses it:
--
--   local redis = require("spec.support.redis")
--   lazy_setup(function() srv = redis.start() end)
--   lazy_teardown(function() redis.stop_all() end)   -- consumers, then servers
--   it("...", function()
--     local c = redis.consumer(srv, { "--stream", "jobs", "-j", "2" })
--     ...
--     c:stop()   -- SIGTERM, reaped; asserts nothing it started is left
--   end)
--
-- The server: redis-server on 127.0.0.1 at a free port, started with
-- posix_spawn (spec/support/nginx.lua's spawn, through setpriv --pdeathsig
-- when there is one: a spec that dies takes it along), in a private
-- temporary directory, which is all it writes: `persist = true` keeps an
-- append-only file there with appendfsync always (srv:restart() then loses
-- nothing that was acknowledged), otherwise no persistence at all. Never the
-- system's redis: nothing here connects to a port it did not start.
-- srv.port, srv.addr ("127.0.0.1:PORT"), srv.dir, srv:call(...) (a reply,
-- or an error raised), srv:restart([signal]) (kill, default SIGKILL, and
-- start again on the same port and directory), srv:stop().
--
-- A consumer: `luajit bin/handler serve --redis srv.addr ARGS...`, its
-- output in a file. c.pid, c:output(), c:signal(sig), c:exited() (reaps:
-- "exit N" | "signal N" | nil), c:wait(seconds), c:ids() (the processes it
-- started, as nginx.identify gives them: its supervisor and workers),
-- c:stop() (SIGTERM, then SIGKILL after 20 s; returns how it ended).
local ffi = require("ffi")
local H = require("spec.support.helpers")
local nginx = require("spec.support.nginx")

local ipairs, pairs, tostring, tonumber, error, setmetatable, pcall =
  ipairs, pairs, tostring, tonumber, error, setmetatable, pcall

pcall(ffi.cdef, [[int hd_redis_kill(int pid, int sig) __asm__("kill");]])
local C = ffi.C
local SIGKILL, SIGTERM = 9, 15

local M = {}

local function which(name)
  local p = io.popen("command -v " .. name .. " 2>/dev/null")
  local path = p:read("*l")
  p:close()
  if path == nil or path == "" then return nil end
  return path
end

local REDIS = os.getenv("HANDLER_REDIS_SERVER") or which("redis-server")
local SETPRIV = which("setpriv")
local LUAJIT = which("luajit")

--- Whether the harness can run: true, or false and why.
function M.available()
  if REDIS == nil then return false, "no redis-server (Debian: apt install redis-server)" end
  if not pcall(require, "redis") then return false, "no lua-redis (Debian: apt install lua-redis)" end
  return true
end

local live_servers, live_consumers = {}, {}

local function with_pdeathsig(argv)
  if SETPRIV then
    table.insert(argv, 1, SETPRIV)
    table.insert(argv, 2, "--pdeathsig")
    table.insert(argv, 3, "KILL")
  end
  return argv
end

---------------------------------------------------------------------------
-- The server.

local Server = {}
Server.__index = Server

local function connect(srv)
  local remote = require("handler.remote")
  return remote.connect("127.0.0.1", srv.port)
end

--- srv:call(...) -> the reply; an error reply or no connection raises.
function Server:call(...)
  self.conn = self.conn or connect(self)
  local r, e = self.conn:call(...)
  if r == nil then error(e, 2) end
  return r
end

--- srv:try(...) -> reply | nil, message (never raises).
function Server:try(...)
  self.conn = self.conn or connect(self)
  return self.conn:call(...)
end

local function launch(srv)
  local argv = with_pdeathsig({ REDIS, "--port", tostring(srv.port), "--bind", "127.0.0.1",
    "--dir", srv.dir, "--save", "", "--daemonize", "no", "--protected-mode", "yes",
    "--appendonly", srv.persist and "yes" or "no", "--appendfsync", "always",
    "--logfile", "" })
  -- Not the sanitizers' preload of an ASan run (tools/test): redis-server is
  -- not ours to check, and its own allocator does not mix with it.
  local env = {}
  for _, e in ipairs(nginx.env()) do
    if not e:match("^LD_PRELOAD=") then env[#env + 1] = e end
  end
  srv.pid = nginx.spawn(argv, env, srv.dir .. "/redis.log")
  srv.exit = nil
  return nginx.wait_for(function()
    if srv:exited() then return true end
    local c = connect(srv)
    local r = c:call("PING")
    c:close()
    return r == "PONG"
  end, 15) and not srv.exit
end

function Server:exited()
  if self.exit then return true end
  self.exit = nginx.reap(self.pid, 0)
  return self.exit ~= nil
end

--- srv:log() -> what redis-server wrote.
function Server:log()
  return H.read_file(self.dir .. "/redis.log") or ""
end

--- Kills the server (SIGKILL unless told) and starts it again on the same
-- port and directory; returns once it answers.
function Server:restart(sig)
  if self.conn then self.conn:close() end
  self.conn = nil
  C.hd_redis_kill(self.pid, sig or SIGKILL)
  self.exit = nginx.reap(self.pid, 10)
  if not launch(self) then
    error("redis harness: redis-server does not answer after a restart\n" .. self:log(), 2)
  end
end

function Server:stop()
  if self.stopped then return end
  self.stopped = true
  live_servers[self] = nil
  if self.conn then self.conn:close() end
  if not self:exited() then
    C.hd_redis_kill(self.pid, SIGTERM)
    if nginx.reap(self.pid, 10) == nil then
      C.hd_redis_kill(self.pid, SIGKILL)
      nginx.reap(self.pid, 10)
    end
  end
  H.rm_r(self.dir)
end

--- start{ persist = bool, port = n } -> a server that answers PING (on a
-- free port unless told).
function M.start(opts)
  opts = opts or {}
  local ok, why = M.available()
  if not ok then error("redis harness: " .. why, 2) end
  local srv = setmetatable({ persist = opts.persist, dir = H.tmpdir() }, Server)
  live_servers[srv] = true
  for _ = 1, opts.port and 1 or 5 do
    srv.port = opts.port or nginx.free_port()
    srv.addr = "127.0.0.1:" .. srv.port
    if launch(srv) then return srv end
    nginx.reap(srv.pid, 2)
  end
  local log = srv:log()
  srv:stop()
  error("redis harness: redis-server would not start\n" .. log, 2)
end

---------------------------------------------------------------------------
-- Consumers.

local Consumer = {}
Consumer.__index = Consumer

--- consumer(srv, args [, env]) -> a running `handler serve` (args: a list of
-- its arguments after --redis ADDR; env: more "NAME=value" strings).
function M.consumer(srv, args, env)
  local argv = with_pdeathsig({ LUAJIT, "bin/handler", "serve", "--redis", srv.addr })
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  local e = nginx.env()
  e[#e + 1] = "LUA_PATH=" .. package.path
  e[#e + 1] = "LUA_CPATH=" .. package.cpath
  for _, x in ipairs(env or {}) do e[#e + 1] = x end
  local dir = H.tmpdir()
  local c = setmetatable({ dir = dir, log = dir .. "/output" }, Consumer)
  c.pid = nginx.spawn(argv, e, c.log)
  live_consumers[c] = true
  return c
end

function Consumer:output()
  return H.read_file(self.log) or ""
end

function Consumer:signal(sig)
  if self.exit == nil then C.hd_redis_kill(self.pid, sig) end
end

--- How it ended ("exit N", "signal N"), or nil while it runs; reaps it.
function Consumer:exited()
  if self.exit == nil then self.exit = nginx.reap(self.pid, 0) end
  return self.exit
end

--- Waits up to `seconds` for it to end; how it ended, or nil.
function Consumer:wait(seconds)
  if self.exit == nil then self.exit = nginx.reap(self.pid, seconds) end
  return self.exit
end

--- The processes it started (supervisor, workers), as they are now.
function Consumer:ids()
  if self:exited() then return {} end
  return nginx.identify(nginx.descendants_of(self.pid))
end

--- SIGTERM, SIGKILL after 20 s; how it ended. The directory goes.
function Consumer:stop()
  if self.exit == nil then
    self:signal(SIGTERM)
    if self:wait(20) == nil then
      self:signal(SIGKILL)
      self:wait(10)
    end
  end
  live_consumers[self] = nil
  return self.exit
end

--- Stops every consumer, then every server, still running.
function M.stop_all()
  for c in pairs(live_consumers) do pcall(c.stop, c) end
  for s in pairs(live_servers) do pcall(s.stop, s) end
end

--- "pid (cmd), ..." of identify() lists, for messages.
M.describe = nginx.describe
M.living = nginx.living

-- When this process's Lua state closes, whatever is left is stopped.
local sentinel = newproxy(true)
getmetatable(sentinel).__gc = function() pcall(M.stop_all) end
M._sentinel = sentinel

--- await(job [, seconds]) -> what job:await() returns, once the remote job
-- is done; fails the test after `seconds` (30) instead of waiting forever.
function M.await(job, seconds)
  if job == nil then error("no job", 2) end
  if not H.wait_until(function() return job:done() end, seconds or 30) then
    error("no outcome for entry " .. tostring(job.id) .. " after " .. (seconds or 30) .. " s", 2)
  end
  return job:await()
end

--- Fields of a stream entry's field list, as a table.
function M.fields(list)
  local t = {}
  for i = 1, #list - 1, 2 do t[list[i]] = list[i + 1] end
  return t
end

--- All the entries of a stream: { { id = ..., fields = {...} }, ... }.
function Server:entries(stream)
  local out, from = {}, "-"
  while true do
    local r = self:call("XRANGE", stream, from, "+", "COUNT", 1000)
    if #r == 0 then return out end
    for _, e in ipairs(r) do
      if e[1] ~= from then out[#out + 1] = { id = e[1], fields = M.fields(e[2]) } end
    end
    if #r < 1000 then return out end
    from = "(" .. r[#r][1]
  end
end

--- The number of entries pending in a group (XPENDING's summary).
function Server:pending(stream, group)
  local r = self:call("XPENDING", stream, group or "handler")
  return tonumber(r[1]) or 0
end

return M
