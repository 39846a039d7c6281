-- adapter_copas_spec.lua: handler.copas, waiting for jobs from coroutines
-- of copas without blocking it (spec/support/adapter_cases.lua), and what
-- is particular to copas.
local has_copas, copas = pcall(require, "copas")

if not has_copas then
  describe("handler.copas", function()
    pending("copas is not installed (Debian: lua-copas; tools/setup installs it): "
      .. tostring(copas))
  end)
  return
end

local socket = require("socket")
local handler = require("handler")
local H = require("spec.support.helpers")
local cases = require("spec.support.adapter_cases")
local A = require("handler.copas")

-- Copas keeps the sockets it waits for in two sets, upvalues of
-- copas.receive and copas.send; nil when this copas keeps them elsewhere.
local function upvalue(fn, name)
  for i = 1, 60 do
    local n, v = debug.getupvalue(fn, i)
    if n == nil then return nil end
    if n == name then return v end
  end
end
local reading, writing = upvalue(copas.receive, "_reading"), upvalue(copas.send, "_writing")

local L = { name = "handler.copas" }

function L.spawn(fn)
  copas.addthread(fn)
end

function L.idle()
  if reading == nil or writing == nil then return true end
  return reading[1] == nil and writing[1] == nil
end

-- Copas's loop never returns: steps until the coroutines ended and copas
-- waits for nothing. Each step waits up to 1 s for a socket, so a
-- dispatcher that misses a wake-up shows as a second late.
function L.run(seconds, finished)
  local deadline = H.now() + seconds
  while H.now() < deadline do
    if finished() and L.idle() then return true end
    copas.step(1)
  end
  return false
end

-- Copas has no timers: the ticker is two coroutines bouncing a datagram
-- between two sockets, each bounce a turn of copas's loop.
function L.ticker()
  local n, stopped = 0, false
  local a, b = socket.udp(), socket.udp()
  for _, s in ipairs({ a, b }) do
    assert(s:setsockname("127.0.0.1", 0))
    s:settimeout(0)
  end
  local a_ip, a_port = a:getsockname()
  local b_ip, b_port = b:getsockname()
  copas.addthread(function()
    while not stopped do
      copas.sendto(a, "ping", b_ip, b_port)
      copas.receivefrom(a, 16)
      n = n + 1
    end
    a:close()
  end)
  copas.addthread(function()
    while true do
      local data = copas.receivefrom(b, 16)
      if data == "stop" or stopped then break end
      copas.sendto(b, "pong", a_ip, a_port)
    end
    b:close()
  end)
  return {
    count = function() return n end,
    stop = function()
      stopped = true
      -- Both wait for a datagram at most once more.
      a:sendto("stop", b_ip, b_port)
      b:sendto("stop", a_ip, a_port)
    end,
  }
end

describe("handler.copas", function()
  cases(A, L)

  it("lets the others run while a coroutine waits, with copas.loop's blocking step", function()
    local job = assert(handler.default_pool():async(function()
      local t = os.clock()
      while os.clock() - t < 0.1 do end
      return 5
    end))
    local order = {}
    copas.addthread(function()
      order[#order + 1] = "waiting"
      local v = select(2, A.await(job))
      order[#order + 1] = v
    end)
    copas.addthread(function() order[#order + 1] = "other" end)
    -- copas.step() without a timeout blocks in select until a socket is
    -- ready (with none registered, for ever): the dispatcher's descriptor
    -- is one, and the woken coroutine's object another.
    -- (Copas 1.x runs a thread as it is added; later ones in a step.)
    copas.step(0)
    local deadline = H.now() + 10
    while (order[3] == nil or not L.idle()) and H.now() < deadline do
      assert.is_false(L.idle(), "copas waits for nothing: " .. table.concat(order, ", "))
      copas.step()
    end
    assert.are.same({ "waiting", "other", 5 }, order)
    assert.is_true(L.idle())
  end)

  it("runs examples/copas.lua", function()
    local out = H.run_host(assert(H.read_file("examples/copas.lua")))
    H.assert_has_all(out, { "done   a quick sum: 500000500000",
      "failed a raised error: ProcessExit", "failed an endless loop, max_ms = 350: Timeout",
      "all done after" })
  end)
end)
