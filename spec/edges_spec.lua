-- edges_spec.lua: values at the edges of what the options take (math.huge,
-- 1e30), a host VM the module was not built for, a supervisor killed over and
-- over. Run on the sanitizer
-- build too, where a float-to-integer conversion out of range is an error.
local handler = require("handler")
local H = require("spec.support.helpers")

local format = string.format
local huge = math.huge

describe("edges", function()
  H.leak_checked()

  describe("options at the edge of their range", function()
    -- Each runs a job that succeeds: the value means "no limit" or "a very
    -- large one", never an undefined conversion or a timer that fires early.
    local cases = {
      { "max_output_bytes = math.huge", { max_output_bytes = huge } },
      { "max_ms = math.huge", { max_ms = huge } },
      { "max_ms = 1e14", { max_ms = 1e14 } },
      { "max_heap_bytes = 1e30", { max_heap_bytes = 1e30 }, { max_memory_bytes = huge } },
      { "max_result_bytes = 1e30", { max_result_bytes = 1e30 } },
    }
    for _, c in ipairs(cases) do
      it(c[1] .. " runs the job as if unlimited", function()
        local pool = handler.pool(c[3] or {})
        local ok, v = pool:run(function() io.write(""); return 6 * 7 end, c[2])
        pool:close()
        assert.is_true(ok, tostring(v))
        assert.are.equal(42, v)
      end)
    end

    it("pool_timeout = math.huge waits until capacity frees, however long", function()
      local pool = handler.pool({ max_workers = 1 })
      local first = assert(pool:async(function()
        local t = os.clock() + 0.2
        while os.clock() < t do end
        return "first"
      end))
      local second = assert(pool:async(function() return "second" end,
        { pool_timeout = huge }))
      assert.are.equal(1, pool:stats().queued)
      assert.are.same({ true, "first" }, { first:await() })
      assert.are.same({ true, "second" }, { second:await() })
      pool:close()
    end)

    it("idle_ms = math.huge keeps an idle worker", function()
      local pool = handler.pool({ max_workers = 1, idle_ms = huge })
      local ok, pid = pool:run(function()
        local f = io.open("/proc/self/stat")
        local s = f:read("*l")
        f:close()
        return tonumber(s:match("^(%d+)"))
      end)
      assert.is_true(ok)
      handler.step()
      assert.is_true(H.alive(pid))
      assert.are.equal(1, pool:stats().processes)
      pool:close()
    end)

    it("spin_us = math.huge is taken and waits still end", function()
      handler.configure({ spin_us = huge })
      local ok, v = handler.run(function() return 1 end)
      handler.configure({ spin_us = 50 })
      assert.is_true(ok)
      assert.are.equal(1, v)
    end)
  end)

  it("refuses a VM other than LuaJIT 2.1, saying so", function()
    -- busted itself runs on Debian's lua5.2, so it is there to try.
    local dir = H.tmpdir()
    local out = dir .. "/out"
    os.execute(format("cd %s && lua5.2 -e %s > %s 2>&1", H.shell_quote(os.getenv("PWD") or "."),
      H.shell_quote('package.path = "lua/?.lua;lua/?/init.lua;" .. package.path; '
        .. 'print(pcall(require, "handler"))'), H.shell_quote(out)))
    local text = H.read_file(out)
    H.rm_r(dir)
    assert.matches("false\thandler needs LuaJIT 2.1; this is Lua 5.2", text, 1, true)
  end)

  it("reaps each supervisor killed under it, leaving no zombie", function()
    local out = H.run_host([[
      local handler = require("handler")
      local ffi = require("ffi")
      ffi.cdef("int kill(int, int); int getpid(void);")
      local core = handler._core
      for i = 1, 10 do
        local ok = handler.run(function() return 1 end)
        local sup = core.procs().supervisor
        ffi.C.kill(sup, 9)
        -- The next run finds it gone and starts another.
        local t = os.time() + 5
        repeat handler.step() until core.procs().supervisor ~= sup or os.time() > t
        io.write(ok and "ran " or "failed ")
      end
      assert(handler.run(function() return 1 end))
      -- What is left under the host: the live supervisor, nothing dead.
      os.execute("sleep 0.2")
      handler.step()
      local f = io.open("/proc/" .. ffi.C.getpid() .. "/task/" .. ffi.C.getpid() .. "/children")
      local zombies = 0
      for pid in f:read("*a"):gmatch("%d+") do
        local s = io.open("/proc/" .. pid .. "/stat")
        if s and s:read("*a"):match("^%d+ %b() (%a)") == "Z" then zombies = zombies + 1 end
        if s then s:close() end
      end
      f:close()
      print("zombies " .. zombies)
    ]])
    assert.matches(("ran "):rep(10), out, 1, true)
    assert.matches("zombies 0", out, 1, true)
  end)
end)
