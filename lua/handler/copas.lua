-- handler.copas: waiting for handler's jobs from coroutines of copas,
-- without blocking its loop.
--
-- Copas (as Debian ships it, 1.x) waits only for sockets, through
-- socket.select, and keeps one coroutine per socket; it has no timers. So:
-- one dispatcher thread waits for readability of a descriptor of this
-- module's, an epoll set holding handler.fd() and a timerfd, which is set
-- for the loop's next timer (handler.timeout()) or the nearest wait_any
-- timeout. It steps handler's loop (handler.waitlist), and each coroutine
-- that waits sleeps on an object of its own, which becomes ready (through
-- LuaSocket's `dirty` hook, without a descriptor) when it is woken.

local copas = require("copas")
local ffi = require("ffi")
local handler = require("handler")
local waitlist = require("handler.waitlist")
local adapter = require("handler.adapter")

local setmetatable, pairs, pcall, error, tonumber, floor, huge =
  setmetatable, pairs, pcall, error, tonumber, math.floor, math.huge
local receive, addthread = copas.receive, copas.addthread

local NAME = "handler.copas"

-- Declared under names of the module's own (asm labels), so they never
-- clash with another declaration of the same C functions.
pcall(ffi.cdef, [[
typedef struct { long sec; long nsec; } hd_copas_timespec;
typedef struct { hd_copas_timespec interval, value; } hd_copas_itimerspec;
int hd_copas_epoll_create1(int flags) __asm__("epoll_create1");
int hd_copas_epoll_ctl(int ep, int op, int fd, void *event) __asm__("epoll_ctl");
int hd_copas_timerfd_create(int clock, int flags) __asm__("timerfd_create");
int hd_copas_timerfd_settime(int fd, int flags, const hd_copas_itimerspec *value,
  hd_copas_itimerspec *old) __asm__("timerfd_settime");
int hd_copas_clock_gettime(int clock, hd_copas_timespec *ts) __asm__("clock_gettime");
long hd_copas_read(int fd, void *buf, unsigned long n) __asm__("read");
int hd_copas_close(int fd) __asm__("close");
]])
local C = ffi.C
local CLOCK_MONOTONIC, CLOEXEC, NONBLOCK, TFD_TIMER_ABSTIME = 1, 0x80000, 0x800, 1
local EPOLL_CTL_ADD, EPOLLIN = 1, 1

local ts = ffi.new("hd_copas_timespec")
local function now()
  C.hd_copas_clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.sec) + tonumber(ts.nsec) / 1e9
end

---------------------------------------------------------------------------
-- The dispatcher's descriptor: an epoll set of handler.fd() and a timerfd,
-- open while the dispatcher runs.

local ep, tfd = -1, -1
-- struct epoll_event is 12 bytes on x86-64 and 16 elsewhere; only its
-- first field, the events, matters here.
local event = ffi.new("uint32_t[4]", EPOLLIN)
local spec = ffi.new("hd_copas_itimerspec")
local drain = ffi.new("uint64_t[1]")

local function close_fds()
  if ep >= 0 then C.hd_copas_close(ep) end
  if tfd >= 0 then C.hd_copas_close(tfd) end
  ep, tfd = -1, -1
end

local function open_fds()
  ep = C.hd_copas_epoll_create1(CLOEXEC)
  tfd = C.hd_copas_timerfd_create(CLOCK_MONOTONIC, CLOEXEC + NONBLOCK)
  if ep < 0 or tfd < 0 or C.hd_copas_epoll_ctl(ep, EPOLL_CTL_ADD, handler.fd(), event) ~= 0
    or C.hd_copas_epoll_ctl(ep, EPOLL_CTL_ADD, tfd, event) ~= 0 then
    local errno = ffi.errno()
    close_fds()
    error(NAME .. ": cannot make the dispatcher's descriptor (errno " .. errno .. ")", 0)
  end
end

-- Sets the timerfd for `due` (seconds on the monotonic clock), or disarms
-- it (nil). A due time in the past fires at once.
local function arm(due)
  if due == nil then
    spec.value.sec, spec.value.nsec = 0, 0
  else
    local s = floor(due)
    spec.value.sec, spec.value.nsec = s, floor((due - s) * 1e9)
    if s <= 0 and spec.value.nsec == 0 then spec.value.nsec = 1 end
  end
  C.hd_copas_timerfd_settime(tfd, TFD_TIMER_ABSTIME, spec, nil)
end

---------------------------------------------------------------------------
-- Objects copas waits on. copas.receive(obj) calls obj:receive() and, while
-- it says "timeout", yields until socket.select says obj is readable; the
-- select asks obj:getfd(), and takes an object whose dirty() is true as
-- readable at once. When the coroutine ends copas closes the object that
-- last woke it.

-- A sleeping coroutine's object: no descriptor until it is woken; then it
-- is dirty (a valid descriptor is needed for select to ask; handler.fd()
-- is one, and select leaves it out of that round).
local Sleeper = {}
Sleeper.__index = Sleeper
function Sleeper:getfd() return self.woken and handler.fd() or -1 end
function Sleeper:dirty() return self.woken end
function Sleeper:receive()
  if self.woken then return true end
  return nil, "timeout"
end
function Sleeper:close() end
function Sleeper:settimeout() end

-- The dispatcher's object: the epoll set; dirty when it is kicked.
local Bell = {}
Bell.__index = Bell
function Bell:getfd() return ep end
function Bell:dirty() return self.kicked end
-- Says "timeout" the first time, and is ready when copas wakes the
-- dispatcher for it.
function Bell:receive()
  if self.waiting then
    self.waiting = false
    return true
  end
  self.waiting = true
  return nil, "timeout"
end
function Bell:close() end
function Bell:settimeout() end

local bell = setmetatable({ waiting = false, kicked = false }, Bell)

---------------------------------------------------------------------------
-- The dispatcher.

local sleeping = 0
local running = false
-- Sleepers with a time limit -> their due time.
local timers = {}

local function dispatch()
  while true do
    bell.kicked = false
    waitlist.step()
    local t = now()
    local due = huge
    for w, at in pairs(timers) do
      if at <= t then
        timers[w] = nil
        w.fire()
      elseif at < due then
        due = at
      end
    end
    if not adapter.needed(sleeping) then return end
    local ms = adapter.timeout_ms()
    if ms ~= nil and t + ms / 1000 < due then due = t + ms / 1000 end
    arm(due < huge and due or nil)
    receive(bell)
    C.hd_copas_read(tfd, drain, 8)
  end
end

-- The dispatcher runs, and steps soon (a job just started may need a step
-- before the descriptor tells of it).
local function ensure()
  if running then
    bell.kicked = true
    return
  end
  -- In the caller: a descriptor that cannot be made is its error.
  open_fds()
  running = true
  bell.waiting = false
  addthread(function()
    local ok, err = pcall(dispatch)
    close_fds()
    running = false
    if not ok then error(err, 0) end
  end)
end

local function wait_woken(w)
  ensure()
  receive(w.obj)
end

local function sleep(w, timeout_ms)
  sleeping = sleeping + 1
  if timeout_ms ~= nil then timers[w] = now() + timeout_ms / 1000 end
  local ok, err = pcall(wait_woken, w)
  timers[w] = nil
  sleeping = sleeping - 1
  -- The dispatcher sees whether it is still needed.
  if sleeping == 0 then bell.kicked = true end
  if not ok then error(err, 0) end
end

local function waiter()
  local obj = setmetatable({ woken = false }, Sleeper)
  local w = { obj = obj, sleep = sleep }
  function w.fire() obj.woken = true end
  return w
end

return adapter.new(NAME, {
  inside = function() return adapter.coroutine() ~= nil end,
  where = "a coroutine run by copas (copas.addthread(fn) or a server's handler), "
    .. "not the main thread",
  waiter = waiter,
})
