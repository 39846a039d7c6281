-- handler.shared: a pool's budget held across every nginx worker of one
-- nginx, in a lua_shared_dict. Each nginx worker has its own worker
-- processes; the budget says how many jobs of the pool may run at once,
-- and how much max_heap_bytes they may reserve, machine-wide.
--
-- Keys, for a pool named P: "handler|P|w" and "handler|P|m", the slots and
-- bytes reserved by all; "handler|P|w|PID" and "handler|P|m|PID", those of
-- the nginx worker PID (its ledger); "handler|P|p|PID", that worker's
-- start time, which tells it apart from a later process with its pid. A
-- worker that dies mid-job (a crash, a kill) leaves its ledger behind: the
-- next worker that finds the budget full takes the ledgers of dead workers
-- back (at most once a second per worker).

local ngx = ngx

local error, format, tonumber, tostring, open, ipairs, setmetatable =
  error, string.format, tonumber, tostring, io.open, ipairs, setmetatable

local M = {}

local SWEEP_EVERY_S = 1
local LOCK_TTL_S = 5

-- This process's start time, in clock ticks since boot (field 22 of
-- /proc/PID/stat), or nil when it cannot be read.
local function start_time(pid)
  local f = open("/proc/" .. pid .. "/stat", "r")
  if f == nil then return nil end
  local s = f:read("*a")
  f:close()
  if s == nil then return nil end
  -- The command (field 2) is in parentheses and may hold spaces.
  local rest = s:match("^%d+ %b() (.*)$")
  if rest == nil then return nil end
  local i = 2
  for field in rest:gmatch("%S+") do
    i = i + 1
    if i == 22 then return tonumber(field) end
  end
  return nil
end

local Budget = {}
Budget.__index = Budget

--- new(dict_name, pool_name, max_workers, max_memory) -> budget; raises
-- naming the dict when nginx has no lua_shared_dict of that name.
function M.new(dict_name, pool_name, max_workers, max_memory)
  local dict = ngx.shared[dict_name]
  if dict == nil then
    error(format("handler.pool: no lua_shared_dict named '%s' (declare it in nginx.conf's "
      .. "http block: lua_shared_dict %s 1m;)", dict_name, dict_name), 3)
  end
  local k = "handler|" .. pool_name .. "|"
  return setmetatable({
    dict = dict, dict_name = dict_name, key = k, max_workers = max_workers,
    max_memory = max_memory, kw = k .. "w", km = k .. "m", pid = nil, swept = 0,
  }, Budget)
end

-- The ledger keys of this process, made on first use (so in each nginx
-- worker, after the fork).
function Budget:ledger()
  local pid = ngx.worker.pid()
  if self.pid ~= pid then
    self.pid = pid
    self.lw = self.key .. "w|" .. pid
    self.lm = self.key .. "m|" .. pid
    self.dict:set(self.key .. "p|" .. pid, start_time(pid) or 0)
  end
end

-- Gives back the ledgers of nginx workers that are gone.
function Budget:sweep()
  local now = ngx.now()
  if now - self.swept < SWEEP_EVERY_S then return false end
  self.swept = now
  local dict, key = self.dict, self.key
  local lock = key .. "lock"
  if not dict:add(lock, true, LOCK_TTL_S) then return false end
  local prefix = key .. "p|"
  local took = false
  for _, k in ipairs(dict:get_keys(0)) do
    if k:sub(1, #prefix) == prefix then
      local pid = k:sub(#prefix + 1)
      local started = dict:get(k)
      local now_started = start_time(pid)
      if tonumber(pid) ~= self.pid and (now_started == nil or (started ~= 0 and now_started ~= started)) then
        local w = dict:get(key .. "w|" .. pid) or 0
        local m = dict:get(key .. "m|" .. pid) or 0
        if w ~= 0 then dict:incr(self.kw, -w, 0) end
        if m ~= 0 then dict:incr(self.km, -m, 0) end
        dict:delete(key .. "w|" .. pid)
        dict:delete(key .. "m|" .. pid)
        dict:delete(k)
        took = took or w ~= 0
      end
    end
  end
  dict:delete(lock)
  return took
end

local function try(self, heap)
  local dict = self.dict
  local w, err = dict:incr(self.kw, 1, 0)
  if w == nil then error("handler: shared budget in lua_shared_dict '" .. self.dict_name
    .. "': " .. tostring(err), 0) end
  if w > self.max_workers then
    dict:incr(self.kw, -1, 0)
    return nil, "NoWorkersAvailable"
  end
  local m = dict:incr(self.km, heap, 0)
  if m == nil or m > self.max_memory then
    dict:incr(self.km, -heap, 0)
    dict:incr(self.kw, -1, 0)
    return nil, "InsufficientMemory"
  end
  dict:incr(self.lw, 1, 0)
  dict:incr(self.lm, heap, 0)
  return true
end

--- reserve(heap) -> true | nil, reject type, never (true when it can never
-- fit: more than the whole budget)
function Budget:reserve(heap)
  if heap > self.max_memory then return nil, "InsufficientMemory", true end
  if self.max_workers < 1 then return nil, "NoWorkersAvailable", true end
  self:ledger()
  local ok, why = try(self, heap)
  if ok then return true end
  if self:sweep() then return try(self, heap) end
  return nil, why
end

--- release(heap): gives back what reserve(heap) took.
function Budget:release(heap)
  local dict = self.dict
  dict:incr(self.kw, -1, 0)
  dict:incr(self.km, -heap, 0)
  dict:incr(self.lw, -1, 0)
  dict:incr(self.lm, -heap, 0)
end

--- usage() -> slots, bytes reserved machine-wide now.
function Budget:usage()
  return self.dict:get(self.kw) or 0, self.dict:get(self.km) or 0
end

return M
