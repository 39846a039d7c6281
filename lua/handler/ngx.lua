-- handler.ngx: waiting without blocking inside nginx (ngx_lua). A request
-- that waits for a job yields its light thread on a semaphore; one timer
-- per nginx worker, the dispatcher, waits on a cosocket connected to the
-- core's bell (a unix socket that gets a byte when the loop has work),
-- steps the loop and posts the semaphores of the jobs that ended. The
-- dispatcher runs while jobs are in flight or waited for, and ends when
-- there are none, so it never holds up a reload or a quit.

local ngx = ngx
local core = require("handler.core")
local waitlist = require("handler.waitlist")
local semaphore = require("ngx.semaphore")

local error, format, tostring = error, string.format, tostring
local get_phase, timer_at, socket_tcp, log, ERR = ngx.get_phase, ngx.timer.at, ngx.socket.tcp,
  ngx.log, ngx.ERR

local M = {}

-- The phases where a light thread may yield (those where ngx.sleep works).
local YIELDABLE = {
  rewrite = true, access = true, content = true, timer = true,
  ssl_cert = true, ssl_session_fetch = true, ssl_client_hello = true,
}

-- How long the dispatcher's read waits before it looks again whether it is
-- still needed, in ms. Replies and deadlines ring the bell; this is only a
-- backstop.
local DISPATCH_READ_MS = 10000
-- A semaphore's wait is given in seconds; longer waits are done in turns.
local MAX_WAIT_S = 3600

local running = false

local function needed()
  return waitlist.count() > 0 or core.active() > 0
end

local function dispatch(premature)
  local sock = socket_tcp()
  local ok, err = sock:connect("unix:" .. core.bell())
  if not ok then
    running = false
    log(ERR, "handler: cannot connect to the loop's bell: ", err)
    -- Waiters are woken to see for themselves (they step the loop).
    waitlist.step()
    return
  end
  sock:settimeout(DISPATCH_READ_MS)
  while true do
    waitlist.step()
    if not needed() then break end
    ok, err = sock:send("a")
    if ok then ok, err = sock:receive(1) end
    if not ok and err ~= "timeout" then
      log(ERR, "handler: the loop's bell went quiet: ", err)
      break
    end
  end
  sock:close()
  running = false
  -- Work that arrived while the socket closed gets a new dispatcher.
  if needed() and not premature then M.ensure() end
end

--- ensure(): a dispatcher runs (started in a timer when none does).
function M.ensure()
  if running then return end
  local ok, err = timer_at(0, dispatch)
  if not ok then
    error(format("handler: cannot start the loop's dispatcher in nginx: %s", tostring(err)), 0)
  end
  running = true
end

--- check(): raises, at the caller's level, when the current phase cannot
-- yield.
function M.check()
  local phase = get_phase()
  if not YIELDABLE[phase] then
    error(format("handler: cannot wait in the %s phase (it cannot yield; start the job with "
      .. "pool:async and wait for it in a rewrite, access or content handler or a timer)",
      phase), 0)
  end
end

--- wait(jobs, n, timeout_ms, events) -> index | nil: yields the light
-- thread until one of the n job userdatas in jobs is done (with `events`,
-- or has events waiting); the lowest such index, or nil when timeout_ms
-- (nil: none) passes first.
function M.wait(jobs, n, timeout_ms, events)
  local function ready()
    for i = 1, n do
      if core.done(jobs[i]) or (events and core.has_events(jobs[i])) then return i end
    end
    return nil
  end
  local i = ready()
  if i ~= nil then return i end
  if timeout_ms == 0 then
    waitlist.step()
    return ready()
  end
  local deadline = timeout_ms and ngx.now() + timeout_ms / 1000
  local sema = semaphore.new()
  local function waiter() sema:post(1) end
  while true do
    local registered = true
    for k = 1, n do
      if waitlist.add(waiter, jobs[k]) then registered = false end
    end
    if registered then
      M.ensure()
      local left = deadline and deadline - ngx.now() or MAX_WAIT_S
      if left > 0 then sema:wait(left < MAX_WAIT_S and left or MAX_WAIT_S) end
    end
    waitlist.remove(waiter)
    i = ready()
    if i ~= nil then return i end
    if deadline ~= nil then
      ngx.update_time()
      if ngx.now() >= deadline then return nil end
    end
  end
end

return M
