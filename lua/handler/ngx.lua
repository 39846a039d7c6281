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

-- Without the bell (it could not be reached), the dispatcher steps the
-- loop this often, in seconds, while it is needed.
local POLL_S = 0.001
-- After the last job, the dispatcher stays this long (s) for the next one,
-- so back-to-back jobs do not each connect anew.
local LINGER_S = 0.05

local function exiting()
  return ngx.worker and ngx.worker.exiting and ngx.worker.exiting()
end

-- The bell could not be reached: correct, if slower, by looking at the
-- loop every POLL_S while needed.
local function poll_loop()
  while true do
    waitlist.step()
    if not needed() or exiting() then return end
    ngx.sleep(POLL_S)
  end
end

local function connect()
  local sock, ok, err
  for pause = 1, 3 do
    sock = socket_tcp()
    ok, err = sock:connect("unix:" .. core.bell())
    if ok then return sock end
    ngx.sleep(0.001 * pause)
  end
  return nil, err
end

local function dispatch(premature)
  local sock, err = connect()
  if sock == nil then
    log(ERR, "handler: cannot connect to the loop's bell (looking at the loop every ",
      POLL_S * 1000, " ms instead): ", err)
    if not premature then poll_loop() end
    running = false
    waitlist.step()
    return
  end
  local ok, linger_until
  while true do
    waitlist.step()
    if needed() then
      linger_until = nil
      sock:settimeout(DISPATCH_READ_MS)
    else
      if premature or exiting() then break end
      ngx.update_time()
      linger_until = linger_until or ngx.now() + LINGER_S
      local left = linger_until - ngx.now()
      if left <= 0 then break end
      sock:settimeout(left * 1000)
    end
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
