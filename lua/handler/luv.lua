-- handler.luv: waiting for handler's jobs from coroutines of a luv loop,
-- without blocking it. One dispatcher: a poll handle on handler.fd() and a
-- timer for handler.timeout(), both open only while a coroutine waits or a
-- job is in flight, so uv.run() returns once the work is done. Their
-- callbacks step handler's loop (handler.waitlist) and resume the
-- coroutines whose jobs ended.

local uv = require("luv")
local handler = require("handler")
local waitlist = require("handler.waitlist")
local adapter = require("handler.adapter")

local type, error, pcall, tostring, resume, yield, traceback =
  type, error, pcall, tostring, coroutine.resume, coroutine.yield, debug.traceback

local NAME = "handler.luv"

-- The dispatcher's handles (nil when it does not run) and the descriptor
-- the poll handle watches.
local poll, timer, polled_fd
-- Coroutines asleep in sleep(), and the waiters to resume, in order.
local sleeping = 0
local ready = {}

local function close_handles()
  poll:stop()
  poll:close()
  timer:stop()
  timer:close()
  poll, timer, polled_fd = nil, nil, nil
end

-- Resumes the woken coroutines, then raises the first error one of them
-- raised, as luv's own callbacks would: the others are resumed first.
local function resume_ready()
  local first
  while ready[1] ~= nil do
    local list = ready
    ready = {}
    for i = 1, #list do
      local w = list[i]
      if w.asleep then
        local ok, err = resume(w.co)
        if not ok and first == nil then
          first = type(err) == "string" and traceback(w.co, err) or err
        end
      end
    end
  end
  if first ~= nil then error(first, 0) end
end

local dispatch

-- The dispatcher's turn: step handler's loop, wake whom it concerns, and
-- wait again, for the descriptor or the loop's next timer.
function dispatch()
  waitlist.step()
  if poll ~= nil then
    if adapter.needed(sleeping) then
      local t = adapter.timeout_ms()
      if t ~= nil then timer:start(t, 0, dispatch) else timer:stop() end
    else
      close_handles()
    end
  end
  resume_ready()
end

local function on_poll(err)
  if err ~= nil then
    error(NAME .. ": cannot poll the loop's descriptor: " .. tostring(err), 0)
  end
  dispatch()
end

-- The dispatcher runs, and steps soon (a job just started may need a step
-- before the descriptor tells of it).
local function ensure()
  local fd = handler.fd()
  if poll ~= nil and polled_fd ~= fd then
    -- Another descriptor (the process forked): poll that one.
    close_handles()
  end
  if poll == nil then
    local p, err = uv.new_poll(fd)
    if p == nil then error(NAME .. ": cannot poll the loop's descriptor: " .. tostring(err), 0) end
    poll, timer, polled_fd = p, uv.new_timer(), fd
    poll:start("r", on_poll)
  end
  timer:start(0, 0, dispatch)
end

local function sleep(w, timeout_ms)
  sleeping = sleeping + 1
  local t
  local ok, err = pcall(function()
    ensure()
    if timeout_ms ~= nil then
      t = uv.new_timer()
      -- From now, not from when the loop last read its clock.
      uv.update_time()
      t:start(timeout_ms, 0, w.fire)
    end
    w.asleep = true
    -- Only the dispatcher resumes a waiter, once it was woken.
    repeat yield() until w.woken
  end)
  w.asleep = false
  if t ~= nil then t:close() end
  sleeping = sleeping - 1
  if poll ~= nil and not adapter.needed(sleeping) then close_handles() end
  if not ok then error(err, 0) end
end

local function waiter()
  local w = { co = adapter.coroutine(), asleep = false, woken = false, sleep = sleep }
  function w.fire()
    if w.woken then return end
    w.woken = true
    ready[#ready + 1] = w
    -- Resumed from a callback, never from inside a step of the loop.
    if timer ~= nil then timer:start(0, 0, dispatch) end
  end
  return w
end

return adapter.new(NAME, {
  inside = function() return adapter.coroutine() ~= nil end,
  where = "a coroutine, not the main thread (run it with coroutine.wrap(fn)() "
    .. "before or from uv.run()'s callbacks)",
  waiter = waiter,
})
