-- worker_spec.lua: the worker processes behind handler.run: warm reuse with a
-- fresh lua_State per job, replacement after a kill or a crash, the idle end,
-- print going to the host's stdout, fds, death with the parent, module paths,
-- and no zombie or leaked fd after any outcome.
local handler = require("handler")
local H = require("spec.support.helpers")

local run = handler.run
local tostring, tonumber, type = tostring, tonumber, type

local bodies = H.job_bodies()
local job_fds, report_pid = bodies.fds, bodies.report_pid
local read_number = H.read_number

describe("worker processes", function()
  local leaks = H.leak_checked()

  describe("warm workers", function()
    it("reuses the same process for sequential runs", function()
      assert.is_true((run(function() end)))
      local before = H.workers()
      local started = handler.default_pool():stats().processes_started
      for i = 1, 5 do
        local ok, v = run(function() return i * 2 end)
        assert.is_true(ok)
        assert.are.equal(i * 2, v)
      end
      assert.are.equal(started, handler.default_pool():stats().processes_started)
      -- No process appeared (other pools' idle workers may end meanwhile).
      for _, pid in ipairs(H.workers()) do
        assert.is_true(H.contains(before, pid), "a new worker " .. pid .. " appeared")
      end
    end)

    it("gives each job a fresh lua_State in the reused process", function()
      assert.is_true((run(function() end)))
      local started = handler.default_pool():stats().processes_started
      local ok, err = run(function()
        LEAKED_GLOBAL = "from job 1"
        string.extra = "patched"
        table.insert = nil
        package.loaded.leaked = { "module of job 1" }
        setmetatable(_G, { __index = function() return "meta" end })
        return true
      end)
      assert.is_true(ok, tostring(err))
      local ok2, g, extra, insert, mod, meta = run(function()
        return LEAKED_GLOBAL, string.extra, type(table.insert), package.loaded.leaked,
          getmetatable(_G)
      end)
      assert.is_true(ok2, tostring(g))
      assert.is_nil(g)
      assert.is_nil(extra)
      assert.are.equal("function", insert)
      assert.is_nil(mod)
      assert.is_nil(meta)
      -- Both jobs ran in workers that were already there.
      assert.are.equal(started, handler.default_pool():stats().processes_started)
    end)

    it("forgets the names a job's own modules gave its values", function()
      -- The codec's name cache is part of the image but left out of the
      -- per-job restore while no job writes to it. A job that adds a module
      -- extends it; the next job's values, made at the same addresses, must
      -- not travel under the names of the first job's.
      -- The host has a module of the same name: a value a job finds under
      -- job_module.t comes back as the host's job_module.t.
      local host_t = { "the host's" }
      package.loaded.job_module = { t = host_t }
      local pool = handler.pool({ max_workers = 1 })
      finally(function()
        pool:close()
        package.loaded.job_module = nil
      end)
      -- One function for both jobs, so that their tables take the same
      -- addresses in the worker's heap.
      local function job(add)
        local t = { 1 }
        if add then package.loaded.job_module = { t = t } end
        return t
      end
      assert.is_true((pool:run(job, { args = { false } })))
      local started = pool:stats().processes_started
      for _ = 1, 5 do
        local ok, v = pool:run(job, { args = { true } })
        assert.is_true(ok, tostring(v))
        assert.are.equal(host_t, v)
        ok, v = pool:run(job, { args = { false } })
        assert.is_true(ok, tostring(v))
        assert.are.same({ 1 }, v)
      end
      assert.are.equal(started, pool:stats().processes_started)
    end)

    it("takes a worker that handed a job the registry out of service", function()
      local pool = handler.pool({ max_workers = 1 })
      finally(function() pool:close() end)
      assert.is_true((pool:run(function() return 1 end)))
      -- Each way a job had to the registry or to what C code holds: the
      -- registry itself, the function a C wrapper holds, a C frame's slots.
      local ways = {
        function() return type(debug.getregistry()) end,
        function() return type(select(2, debug.getupvalue(debug.getregistry, 1))) end,
        function() return type(debug.getlocal(1, 1)) end,
        -- A call hook sees the real getupvalue run inside its wrapper.
        function()
          local real
          debug.sethook(function()
            local i = debug.getinfo(2, "f")
            if i and i.func ~= debug.getupvalue and i.func ~= debug.sethook then
              real = real or i.func
            end
          end, "c")
          local up = 1
          debug.getupvalue(function() return up end, 1)
          debug.sethook()
          return type(real)
        end,
        -- The FFI's loader a wrapper holds, and the real loadstring seen
        -- from a call hook (it loads bytecode).
        function() return type(select(2, debug.getupvalue(package.preload.ffi, 1))) end,
        function()
          local real
          debug.sethook(function()
            local i = debug.getinfo(2, "f")
            if i and i.func ~= loadstring and i.func ~= debug.sethook then real = real or i.func end
          end, "c")
          loadstring("return 1")
          debug.sethook()
          return type(real)
        end,
      }
      for _, way in ipairs(ways) do
        local started = pool:stats().processes_started
        local ok, v = pool:run(way)
        assert.is_true(ok, tostring(v))
        assert.is_true((pool:run(function() return 1 end)))
        assert.are.equal(started + 1, pool:stats().processes_started)
      end
    end)

    it("keeps a job that writes the codec's name cache from the next job", function()
      -- Through the function the getregistry wrapper holds, a job finds
      -- the cache and renames the table module "string". The next job's
      -- table module must come back as the host's table module.
      local pool = handler.pool({ max_workers = 1 })
      finally(function() pool:close() end)
      local ok, v = pool:run(function()
        local _, real = debug.getupvalue(debug.getregistry, 1)
        for k, nc in pairs(real()) do
          if type(k) == "userdata" and type(nc) == "table" and type(nc[1]) == "table"
            and type(nc[6]) == "userdata" then
            nc[1][package.loaded.table] = "string"
          end
        end
        return true
      end)
      assert.is_true(ok, tostring(v))
      ok, v = pool:run(function() return package.loaded.table end)
      assert.is_true(ok, tostring(v))
      assert.are.equal(table, v)
    end)

    it("gives a fresh heap: a job that used much of its limit leaves nothing to the next", function()
      local limit = 8 * 2 ^ 20
      local hog = function()
        local t = {}
        for i = 1, 96 do t[i] = string.rep(string.char(i), 65536 - 64) end -- about 6 MiB
        KEEP = t
        return #t
      end
      for _ = 1, 3 do
        local ok, n = run(hog, { max_heap_bytes = limit })
        assert.is_true(ok, tostring(n))
        assert.are.equal(96, n)
      end
    end)

    it("replaces a worker killed for a timeout", function()
      local dir = H.tmpdir()
      local path = dir .. "/pid"
      local ok, err = run(function()
        report_pid(path)
        while true do end
      end, { max_ms = 100 })
      local pid = read_number(path)
      H.rm_r(dir)
      assert.is_false(ok)
      assert.are.equal("Timeout", err.type)
      assert.is_number(pid)
      assert.is_false(H.contains(H.workers(), pid))
      assert.is_true(H.wait_until(function() return H.gone(pid) end),
        "the timed-out worker " .. pid .. " is " .. tostring(H.proc_state(pid)))
      local ok2, v = run(function() return "next" end)
      assert.is_true(ok2)
      assert.are.equal("next", v)
    end)

    it("replaces a worker that crashed or exited", function()
      local crashes = {
        function() local f = require("ffi") f.cast("int *", 0)[0] = 1 end,
        function() os.exit(9) end,
        function() error("raised") end,
      }
      for _, crash in ipairs(crashes) do
        local dir = H.tmpdir()
        local path = dir .. "/pid"
        local ok, err = run(function()
          report_pid(path)
          crash()
        end)
        local pid = read_number(path)
        H.rm_r(dir)
        assert.is_false(ok)
        assert.are.equal("ProcessExit", err.type)
        assert.is_number(pid)
        assert.is_true(H.wait_until(function() return H.gone(pid) or H.contains(H.workers(), pid) end))
        local ok2, v = run(function() return "next" end)
        assert.is_true(ok2)
        assert.are.equal("next", v)
      end
    end)

    it("keeps working after an OOM", function()
      local ok, err = run(function()
        local t = {}
        for i = 1, 1e7 do t[i] = i end
      end, { max_heap_bytes = 4096 })
      assert.is_false(ok)
      assert.are.equal("OOM", err.type)
      local ok2, v = run(function() return "after OOM" end)
      assert.is_true(ok2)
      assert.are.equal("after OOM", v)
    end)

    it("ends an idle worker after idle_ms, while the default pool keeps its own", function()
      -- The default pool has a warm worker (idle_ms 10 s) when this starts.
      assert.is_true((run(function() end)))
      assert.is_true(handler.default_pool():stats().processes >= 1)
      local pool = handler.pool({ idle_ms = 200 })
      local before = H.set_of(H.workers())
      assert.is_true((pool:run(function() end)))
      local new = H.new_workers(before)
      assert.are.equal(1, #new)
      local pid = new[1]
      assert.is_true(H.alive(pid))
      assert.are.equal(1, pool:stats().processes)
      -- Used again within idle_ms: the same process.
      assert.is_true((pool:run(function() end)))
      assert.are.equal(1, pool:stats().processes_started)
      assert.is_true(H.alive(pid))
      local t0 = H.now()
      assert.is_true(H.wait_until(function()
        return pool:stats().processes == 0 and H.gone(pid) and not H.contains(H.workers(), pid)
      end, 5), "idle worker " .. pid .. " still " .. tostring(H.proc_state(pid)))
      -- Not before it had been idle for about idle_ms.
      assert.is_true(H.now() - t0 >= 0.1)
      -- And the pool starts a new one when it needs it.
      assert.is_true((pool:run(function() end)))
      assert.are.equal(2, pool:stats().processes_started)
      local fresh = H.new_workers(before)
      assert.are.equal(1, #fresh)
      assert.are_not.equal(pid, fresh[1])
      pool:close()
      assert.is_true(H.wait_until(function() return H.gone(fresh[1]) end))
    end)

    it("runs concurrent jobs in separate processes", function()
      local pool = handler.default_pool()
      local jobs = {}
      for i = 1, 8 do
        jobs[i] = assert(pool:async(function()
          local f = require("ffi")
          pcall(f.cdef, "int getpid(void); int poll(void *, unsigned long, int);")
          f.C.poll(nil, 0, 100)
          return f.C.getpid()
        end))
      end
      local pids, distinct = {}, 0
      for i = 1, 8 do
        local ok, pid = jobs[i]:await()
        assert.is_true(ok, tostring(pid))
        if not pids[pid] then distinct = distinct + 1 end
        pids[pid] = true
      end
      assert.are.equal(8, distinct)
    end)
  end)

  describe("output", function()
    it("sends a job's print to the host's stdout without harming the protocol", function()
      local out = H.run_host([[
        local handler = require("handler")
        local ok, v = handler.run(function()
          io.stderr:write("to stderr\n")
          print("hello from the job")
          io.write(string.rep("x", 100000), "\n")
          return 42
        end)
        print("result", ok, v)
        local ok2, v2 = handler.run(function() print("second job") return "s" end)
        print("result2", ok2, v2)
      ]])
      H.assert_has_all(out, {
        "hello from the job",
        string.rep("x", 100000),
        "to stderr",
        "second job",
        "result\ttrue\t42",
        "result2\ttrue\ts",
      })
    end)
  end)

  describe("file descriptors", function()
    it("a job sees only stdin, stdout, stderr and the two protocol pipes", function()
      local path = os.tmpname()
      local keep = assert(io.open(path, "w"))
      local ok, fds = run(job_fds)
      keep:close()
      os.remove(path)
      assert.is_true(ok, tostring(fds))
      assert.are.equal("0,1,2,3,4", fds)
    end)

    it("closes fds the host had open when the worker processes started", function()
      local path = os.tmpname()
      local out = H.run_host([[
        local handler = require("handler")
        local keep = assert(io.open(]] .. string.format("%q", path) .. [[, "w"))
        local pipe = io.popen("sleep 0.2")
        local ok, fds = handler.run(]] .. H.FDS_JOB_SOURCE .. [[)
        print("job fds", ok, fds)
        local sup = handler._core.procs().supervisor
        local ls = io.popen("ls -l /proc/" .. sup .. "/fd")
        local listing = ls:read("*a")
        ls:close()
        print("supervisor holds the file", listing:find(]] .. string.format("%q", path) .. [[, 1, true) ~= nil)
        pipe:close()
        keep:close()
      ]])
      os.remove(path)
      assert.matches("job fds\ttrue\t0,1,2,3,4\n", out, 1, true)
      assert.matches("supervisor holds the file\tfalse", out, 1, true)
    end)
  end)

  describe("parent death", function()
    it("ends the worker and the supervisor when the host is killed", function()
      local dir = H.tmpdir()
      local pidfile = dir .. "/worker.pid"
      local script = dir .. "/host.lua"
      H.write_file(script, [[
        local ffi = require("ffi")
        ffi.cdef("int getpid(void);")
        local handler = require("handler")
        local pidfile = ]] .. string.format("%q", pidfile) .. [[
        local job = handler.default_pool():async(function()
          local f = require("ffi")
          f.cdef("int getpid(void);")
          local out = io.open(pidfile .. ".tmp", "w")
          out:write(f.C.getpid())
          out:close()
          os.rename(pidfile .. ".tmp", pidfile)
          while true do end
        end, { max_ms = 600000 })
        io.stdout:write("host ", ffi.C.getpid(), "\n")
        io.stdout:flush()
        job:await()
        print("await returned")
      ]])
      local p = io.popen(H.lua_env() .. " exec luajit " .. H.shell_quote(script) .. " 2>&1")
      local line = p:read("*l")
      local host = tonumber(line and line:match("^host (%d+)$"))
      assert.is_number(host, "the host printed " .. tostring(line))
      local worker
      local started = H.wait_until(function()
        worker = read_number(pidfile)
        return worker ~= nil
      end, 5)
      local sup = worker and select(2, H.proc_state(worker))
      H.kill9(host)
      local worker_ended = worker ~= nil and H.wait_until(function() return not H.alive(worker) end, 5)
      local sup_ended = sup ~= nil and H.wait_until(function() return not H.alive(sup) end, 5)
      -- Whatever outlived the host still holds the pipe: end it before reading.
      if worker and not worker_ended then H.kill9(worker) end
      if sup and not sup_ended then H.kill9(sup) end
      local rest = p:read("*a")
      p:close()
      H.rm_r(dir)
      assert.is_true(started, "the job never started; the host said: " .. tostring(rest))
      assert.is_number(sup)
      assert.are_not.equal(host, sup)
      assert.is_true(worker_ended, "worker " .. worker .. " outlived its host")
      assert.is_true(sup_ended, "supervisor " .. sup .. " outlived its host")
    end)

    it("fails the running job and recovers when the supervisor is killed", function()
      local out = H.run_host([[
        local handler = require("handler")
        assert(handler.run(function() end))
        local sup = handler._core.procs().supervisor
        local job = handler.default_pool():async(function() while true do end end)
        for _ = 1, 50 do
          handler.step()
          if handler.default_pool():stats().running == 1 and #handler._core.procs() > 0 then break end
          os.execute("sleep 0.01")
        end
        os.execute("kill -9 " .. sup)
        local ok, err = job:await()
        print("job", ok, type(err) == "table" and err.type)
        local ok2, v = handler.run(function() return "recovered" end)
        print("next", ok2, v, handler._core.procs().supervisor ~= sup)
      ]])
      assert.matches("job\tfalse\tProcessExit", out, 1, true)
      assert.matches("next\ttrue\trecovered\ttrue", out, 1, true)
    end)

    it("reports outcomes in a host that ignores SIGCHLD", function()
      -- Hosts like nginx reap every child and may ignore SIGCHLD; dispositions
      -- set to ignore survive exec. Outcomes must reach the caller anyway.
      local out = H.run_host([[
        local ffi = require("ffi")
        ffi.cdef("typedef void (*hd_sighandler)(int); hd_sighandler signal(int, hd_sighandler);")
        ffi.C.signal(17, ffi.cast("hd_sighandler", 1)) -- SIGCHLD, SIG_IGN
        local handler = require("handler")
        local function show(label, ok, a)
          print(label, ok, type(a) == "table" and (a.type .. " " .. tostring(a.reason)) or a)
        end
        show("ok", handler.run(function() return 1 end))
        show("segv", handler.run(function() local f = require("ffi") f.cast("int *", 0)[0] = 1 end))
        show("exit", handler.run(function() os.exit(3) end))
        show("timeout", handler.run(function() while true do end end, { max_ms = 20 }))
        show("after", handler.run(function() return 2 end))
      ]])
      H.assert_has_all(out, {
        "ok\ttrue\t1\n",
        "segv\tfalse\tProcessExit SIGSEGV\n",
        "exit\tfalse\tProcessExit exit 3\n",
        "timeout\tfalse\tTimeout nil\n",
        "after\ttrue\t2\n",
      })
    end)
  end)

  describe("module paths", function()
    local dir, saved_path

    before_each(function()
      dir = H.tmpdir()
      saved_path = package.path
    end)

    after_each(function()
      package.path = saved_path
      package.loaded.hd_spec_pathmod = nil
      H.rm_r(dir)
    end)

    -- Workers run in a private directory, so relative entries come to them
    -- made absolute against the caller's directory.
    local function absolute(paths)
      local p = io.popen("pwd")
      local cwd = p:read("*l")
      p:close()
      return (paths:gsub("[^;]+", function(entry)
        if entry:sub(1, 1) == "/" then return entry end
        return cwd .. "/" .. entry
      end))
    end

    it("gives the worker the caller's package.path and package.cpath", function()
      local ok, path, cpath = run(function() return package.path, package.cpath end)
      assert.is_true(ok)
      assert.are.equal(absolute(package.path), path)
      assert.are.equal(absolute(package.cpath), cpath)
    end)

    it("finds a module on a path the caller added after workers started", function()
      H.write_file(dir .. "/hd_spec_pathmod.lua", "return { answer = 42 }\n")
      package.path = dir .. "/?.lua;" .. package.path
      local ok, v = run(function() return require("hd_spec_pathmod").answer end)
      assert.is_true(ok, tostring(v))
      assert.are.equal(42, v)
      local ok2, wpath = run(function() return package.path end)
      assert.is_true(ok2)
      assert.are.equal(absolute(package.path), wpath)
    end)

    it("finds a module the closure captured, by name", function()
      H.write_file(dir .. "/hd_spec_pathmod.lua",
        "local M = {}\nfunction M.double(x) return 2 * x end\nreturn M\n")
      package.path = dir .. "/?.lua;" .. package.path
      local mod = require("hd_spec_pathmod")
      local ok, v = run(function() return mod.double(21) end)
      assert.is_true(ok, tostring(v))
      assert.are.equal(42, v)
    end)

    it("finds a module on the path of a host that set it before loading handler", function()
      H.write_file(dir .. "/hd_spec_pathmod.lua", "return { answer = 'from the temp dir' }\n")
      local out = H.run_host([[
        package.path = ]] .. string.format("%q", dir .. "/?.lua;") .. [[ .. package.path
        local handler = require("handler")
        print("got", handler.run(function() return require("hd_spec_pathmod").answer end))
      ]])
      assert.matches("got\ttrue\tfrom the temp dir", out, 1, true)
    end)
  end)

  describe("after every outcome", function()
    it("leaves no zombie, no stray process and no leaked fd", function()
      local outcomes = {
        { function() return 1 end },
        { function() error("boom") end },
        { function() os.exit(2) end },
        { function() while true do end end, { max_ms = 10 } },
        { function() local t = {} for i = 1, 1e7 do t[i] = i end end, { max_heap_bytes = 4096 } },
        { function() local f = require("ffi") f.cast("int *", 0)[0] = 1 end },
        { function() local f = require("ffi") f.cdef("void abort(void);") f.C.abort() end },
        { function() return coroutine.create(print) end },
        { function() io.open("/dev/null"):close() return io.open("/dev/null") end },
      }
      for round = 1, 3 do
        for i, case in ipairs(outcomes) do
          local ok = run(case[1], case[2])
          assert.are.equal(i == 1, ok, "outcome " .. i .. " of round " .. round)
        end
        -- A call that raises in the caller leaves nothing either.
        local co = coroutine.create(print)
        assert.is_false(pcall(run, function() return co end))
      end
      H.assert_clean(leaks.snap)
    end)
  end)
end)
