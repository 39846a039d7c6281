-- adapter_luv_spec.lua: handler.luv, waiting for jobs from coroutines of a
-- luv loop without blocking it (spec/support/adapter_cases.lua), and how an
-- error of a woken coroutine comes out.
local has_luv, uv = pcall(require, "luv")

if not has_luv then
  describe("handler.luv", function()
    pending("luv is not installed (Debian: lua-luv; tools/setup installs it)")
  end)
  return
end

local H = require("spec.support.helpers")
local cases = require("spec.support.adapter_cases")
local A = require("handler.luv")

-- The handles of luv's loop, open or closing.
local function handles()
  local n = 0
  uv.walk(function() n = n + 1 end)
  return n
end

local L = { name = "handler.luv" }

function L.spawn(fn)
  coroutine.wrap(fn)()
end

function L.run(seconds)
  -- A guard that stops the loop if it never runs out of work; unreferenced,
  -- it does not keep the loop running itself.
  local stuck = false
  local guard = uv.new_timer()
  guard:start(seconds * 1000, 0, function()
    stuck = true
    uv.stop()
  end)
  guard:unref()
  uv.run()
  guard:close()
  uv.run("nowait")
  return not stuck
end

function L.ticker()
  local n = 0
  local t = uv.new_timer()
  t:start(10, 10, function() n = n + 1 end)
  return {
    count = function() return n end,
    stop = function() t:close() end,
  }
end

function L.idle()
  return not uv.loop_alive() and handles() == 0
end

describe("handler.luv", function()
  cases(A, L)

  it("lets any coroutine wait, and runs on when a waiting one raises", function()
    -- luv ends the process on an error in a callback; the error of a
    -- coroutine the dispatcher resumed is one, raised once every coroutine
    -- woken with it has been resumed.
    local out = H.run_host([[
      local uv = require("luv")
      local A = require("handler.luv")
      local handler = require("handler")
      local job = assert(handler.default_pool():async(function() return 7 end))
      coroutine.wrap(function()
        A.await(job)
        error("raised after the wait")
      end)()
      coroutine.wrap(function()
        print("other coroutine got", A.await(job))
      end)()
      uv.run()
      print("not reached")
    ]])
    H.assert_has_all(out, { "raised after the wait", "stack traceback", "other coroutine got\ttrue\t7" })
    assert.is_nil(out:find("not reached", 1, true), out)
  end)

  it("runs examples/luv.lua", function()
    local out = H.run_host(assert(H.read_file("examples/luv.lua")))
    H.assert_has_all(out, { "done   a quick sum: 500000500000", "tick",
      "failed a raised error: ProcessExit", "failed an endless loop, max_ms = 350: Timeout",
      "uv.run() returned: nothing left to do" })
  end)
end)
