-- handler.cqueues: waiting for handler's jobs from coroutines of a cqueues
-- controller, without blocking it. One dispatcher per controller in which
-- something waits: a coroutine that polls handler.fd(), with the loop's next
-- timer (handler.timeout()) as the time limit, steps handler's loop
-- (handler.waitlist) and signals the condition variables the woken
-- coroutines wait on. It ends when nothing waits and no job is in flight,
-- so cq:loop() returns once the work is done.

local cqueues = require("cqueues")
local condition = require("cqueues.condition")
local handler = require("handler")
local waitlist = require("handler.waitlist")
local adapter = require("handler.adapter")

local setmetatable, pcall, error = setmetatable, pcall, error
local running, poll, monotime = cqueues.running, cqueues.poll, cqueues.monotime

local NAME = "handler.cqueues"

-- controller -> { sleeping = n, running = bool, kick = condition }
local states = setmetatable({}, { __mode = "k" })

local function state_of(cq)
  local st = states[cq]
  if st == nil then
    st = { sleeping = 0, running = false, kick = condition.new() }
    states[cq] = st
  end
  return st
end

local function dispatch(st)
  -- What cqueues.poll takes: a descriptor to wait on for reading.
  local bell = { pollfd = -1, events = "r" }
  while true do
    waitlist.step()
    if not adapter.needed(st.sleeping) then return end
    bell.pollfd = handler.fd()
    local t = adapter.timeout_ms()
    if t ~= nil then
      poll(bell, st.kick, t / 1000)
    else
      poll(bell, st.kick)
    end
  end
end

-- The controller's dispatcher runs, and steps soon (a job just started may
-- need a step before the descriptor tells of it).
local function ensure(cq, st)
  if st.running then
    st.kick:signal()
    return
  end
  st.running = true
  cq:wrap(function()
    local ok, err = pcall(dispatch, st)
    st.running = false
    if not ok then error(err, 0) end
  end)
end

local function wait_woken(w, cq, st, timeout_ms)
  ensure(cq, st)
  local cond = w.cond
  local deadline = timeout_ms and monotime() + timeout_ms / 1000
  while not w.woken do
    if deadline ~= nil then
      local left = deadline - monotime()
      if left <= 0 then return end
      cond:wait(left)
    else
      cond:wait()
    end
  end
end

local function sleep(w, timeout_ms)
  local cq = running()
  local st = state_of(cq)
  st.sleeping = st.sleeping + 1
  local ok, err = pcall(wait_woken, w, cq, st, timeout_ms)
  st.sleeping = st.sleeping - 1
  -- The dispatcher sees whether it is still needed.
  if st.sleeping == 0 then st.kick:signal() end
  if not ok then error(err, 0) end
end

local function waiter()
  local w = { woken = false, cond = condition.new(), sleep = sleep }
  function w.fire()
    if w.woken then return end
    w.woken = true
    w.cond:signal()
  end
  return w
end

return adapter.new(NAME, {
  inside = function()
    local cq, inside = running()
    return cq ~= nil and inside and adapter.coroutine() ~= nil
  end,
  where = "a coroutine run by cqueues (cq:wrap(fn))",
  waiter = waiter,
})
