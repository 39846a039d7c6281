-- adapter_cqueues_spec.lua: handler.cqueues, waiting for jobs from
-- coroutines of a cqueues controller without blocking it
-- (spec/support/adapter_cases.lua), and what is particular to cqueues.
local has_cqueues, cqueues = pcall(require, "cqueues")

if not has_cqueues then
  describe("handler.cqueues", function()
    pending("cqueues is not installed (Debian: lua-cqueues; tools/setup installs it)")
  end)
  return
end

local handler = require("handler")
local H = require("spec.support.helpers")
local cases = require("spec.support.adapter_cases")
local A = require("handler.cqueues")

local cq = cqueues.new()

local L = { name = "handler.cqueues" }

function L.spawn(fn)
  cq:wrap(fn)
end

function L.run(seconds)
  -- cq:loop(timeout) returns true when empty or when the time is up.
  local ok, err = cq:loop(seconds)
  if not ok then error(err, 0) end
  return cq:empty()
end

function L.ticker()
  local n, stopped = 0, false
  cq:wrap(function()
    while not stopped do
      cqueues.sleep(0.01)
      n = n + 1
    end
  end)
  return {
    count = function() return n end,
    stop = function() stopped = true end,
  }
end

function L.idle()
  return cq:empty()
end

describe("handler.cqueues", function()
  cases(A, L)

  it("raises in a plain coroutine inside a coroutine of cqueues", function()
    local job = assert(handler.default_pool():async(function() return 1 end))
    local ok, err
    cq:wrap(function()
      ok, err = coroutine.wrap(function()
        return pcall(A.await, job)
      end)()
      A.await(job)
    end)
    assert.is_true((cq:loop(10)))
    assert.is_true(cq:empty())
    assert.is_false(ok)
    assert.matches("handler.cqueues: await must be called from a coroutine run by cqueues", err,
      1, true)
  end)

  it("hands a woken coroutine's error to cq:loop(), and the others go on", function()
    local job = assert(handler.default_pool():async(function() return 7 end))
    local other
    cq:wrap(function()
      A.await(job)
      error("raised after the wait")
    end)
    cq:wrap(function()
      other = H.pack(A.await(job))
    end)
    local ok, err = cq:loop(10)
    assert.is_false(ok)
    assert.matches("raised after the wait", err, 1, true)
    -- The loop goes on from where it stopped.
    assert.is_true((cq:loop(10)))
    assert.is_true(cq:empty())
    assert.are.same({ n = 2, true, 7 }, other)
  end)

  it("waits in nested controllers, each with its own dispatcher", function()
    local inner = cqueues.new()
    local got = {}
    inner:wrap(function() got.inner = H.pack(A.run(function() return "in" end)) end)
    cq:wrap(function()
      got.outer = H.pack(A.run(function() return "out" end))
      -- The inner controller runs as a coroutine of the outer one.
      assert(inner:loop())
    end)
    assert.is_true((cq:loop(10)))
    assert.is_true(cq:empty() and inner:empty())
    assert.are.same({ n = 2, true, "in" }, got.inner)
    assert.are.same({ n = 2, true, "out" }, got.outer)
  end)

  it("runs examples/cqueues.lua", function()
    local out = H.run_host(assert(H.read_file("examples/cqueues.lua")))
    H.assert_has_all(out, { "done   a quick sum: 500000500000", "tick",
      "failed a raised error: ProcessExit", "failed an endless loop, max_ms = 350: Timeout",
      "cq:loop() returned: nothing left to do" })
  end)
end)
