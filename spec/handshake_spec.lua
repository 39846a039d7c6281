-- spec/handshake_spec.lua: a worker executable that is missing, dies at
-- once, or was built for another protocol or another LuaJIT gives a clear
-- error, releases the slot, and leaves the host working and clean.
local H = require("spec.support.helpers")

local format = string.format

-- A fake worker executable: a luajit script that answers the supervisor
-- hello on its control socket (fd 3) with the given version and bytecode
-- header, then waits for the host to go.
local FAKE = [[#!/usr/bin/env luajit
local ffi = require("ffi")
ffi.cdef"long send(int, const void *, unsigned long, int); long read(int, void *, unsigned long);"
local function u32(n)
  return string.char(n % 256, math.floor(n / 256) % 256, math.floor(n / 65536) % 256,
    math.floor(n / 16777216) % 256)
end
local bc = @BC@
local m = "\1" .. u32(@VERSION@) .. u32(1) .. string.char(#bc) .. bc
ffi.C.send(3, m, #m, 0)
local buf = ffi.new("char[64]")
while ffi.C.read(3, buf, 64) > 0 do end
]]

-- Runs a host whose worker executable is `worker`; it runs two jobs and
-- prints each outcome, the pool's budget afterwards, and its own children.
local function host_with(worker)
  return H.run_host(format([[
    local ffi = require("ffi")
    ffi.cdef("int setenv(const char *, const char *, int); int getpid(void);")
    ffi.C.setenv("HANDLER_WORKER", %q, 1)
    local handler = require("handler")
    for i = 1, 2 do
      local ok, err = handler.run(function() return 1 end, { max_ms = 5000 })
      print("run", i, ok, type(err) == "table" and err.type, type(err) == "table" and err.reason)
    end
    local s = handler.default_pool():stats()
    print("budget", s.running, s.bytes_committed)
    -- Give an exiting fake supervisor a moment, then list what is left.
    os.execute("sleep 0.3")
    handler.step()
    local f = io.open("/proc/self/task/" .. ffi.C.getpid() .. "/children")
    print("children", f and f:read("*a") or "?")
  ]], worker))
end


describe("worker executable handshake", function()
  local dir

  before_each(function()
    dir = H.tmpdir()
  end)

  after_each(function()
    H.rm_r(dir)
  end)

  local function fake_hello(bc, version)
    return (FAKE:gsub("@BC@", format("%q", bc)):gsub("@VERSION@", tostring(version)))
  end

  local function fake(name, text)
    local path = dir .. "/" .. name
    H.write_file(path, text)
    os.execute("chmod +x " .. path)
    return path
  end

  local function expect_clean(out)
    assert.matches("budget\t0\t0", out, 1, true)
    -- No child left, not even a zombie supervisor.
    local kids = out:match("children\t([^\n]*)")
    assert.is_not_nil(kids, out)
    assert.are.equal("", (kids:gsub("%s", "")), "host children left: " .. kids)
  end

  -- Worker executables that cannot serve. `worker()` makes one and returns
  -- its path; the line of each run in `runs` (default: the first) must be a
  -- ProcessExit that says each of `says`, and the output must hold `also`.
  local broken = {
    { "reports a missing worker executable by name, on every attempt",
      worker = function() return dir .. "/no-such-worker" end, runs = { 1, 2 },
      says = { "cannot start worker executable", "no-such-worker: No such file or directory" } },
    -- Depending on whether it died before or after the host asked it for a
    -- worker: "cannot start a worker: lost the supervisor process" or
    -- "worker lost: the supervisor process exited".
    { "reports a worker executable that exits at once",
      worker = function() return fake("dies", "#!/bin/sh\nexit 3\n") end,
      says = { "supervisor process" } },
    { "refuses a worker executable that speaks another protocol",
      worker = function() return fake("oldproto", fake_hello("", 999)) end,
      says = { "speaks protocol 999, this module speaks" }, also = "run\t2\tfalse\tProcessExit" },
    -- The right protocol (wire.h's HD_PROTO_VERSION), a bytecode header
    -- this VM does not write.
    { "refuses a worker executable built for another LuaJIT",
      worker = function()
        local version = H.read_file("src/common/wire.h"):match("#define HD_PROTO_VERSION (%d+)")
        return fake("otherjit", fake_hello("\27LJ\1\0", assert(tonumber(version))))
      end,
      says = { "was built for another LuaJIT" } },
  }
  for _, case in ipairs(broken) do
    it(case[1], function()
      local out = host_with(case.worker())
      for _, i in ipairs(case.runs or { 1 }) do
        local line = out:match("run\t" .. i .. "\t([^\n]*)")
        assert.is_not_nil(line, out)
        assert.matches("^false\tProcessExit\t", line)
        for _, text in ipairs(case.says) do assert.matches(text, line, 1, true) end
      end
      if case.also then assert.matches(case.also, out, 1, true) end
      expect_clean(out)
    end)
  end

  it("works with the real worker executable", function()
    local out = host_with(require("handler")._core.worker_path)
    H.assert_has_all(out, { "run\t1\ttrue", "run\t2\ttrue", "budget\t0\t0" })
  end)
end)
