-- attack_isolation_spec.lua: what a sandboxed job can reach of the host, of
-- the supervisor and of other jobs, tried the way a hostile job would. Each
-- sandboxed worker runs in namespaces of its own (user unless the host is
-- root, PID, mount, IPC, network, UTS, cgroup) on a file system of its own,
-- without privileges; a worker of the "syscalls" profile (FFI at hand)
-- serves one job and exits. Cases that could take the host down, or that
-- need a host of their own (its environment, its user), run in a disposable
-- luajit host (H.run_host).
local handler = require("handler")
local H = require("spec.support.helpers")

local format, concat, tostring, select = string.format, table.concat, tostring, select

local resolve, failure = H.resolve, H.expect_failure

local function ok_values(r)
  assert.is_true(r[1], tostring(r[2]))
  return select(2, unpack(r, 1, r.n))
end

local function is_root()
  return (H.read_file("/proc/self/status") or ""):match("Uid:%s*(%d+)") == "0"
end

-- The prelude of a disposable host: handler on its paths, print flushed.
local PRELUDE = [[
  io.stdout:setvbuf("no")
  local ffi = require("ffi")
]]

-- A job (syscalls profile) that lists a directory through the FFI.
local LS = [[function(dir)
  local f = require("ffi")
  pcall(f.cdef, [=[typedef struct { uint64_t ino; int64_t off; unsigned short reclen;
    unsigned char type; char name[256]; } iso_de; void *opendir(const char *p);
    iso_de *readdir(void *d); int closedir(void *d);]=])
  local d = f.C.opendir(dir)
  if d == nil then return nil end
  local t = {}
  while true do
    local e = f.C.readdir(d)
    if e == nil then break end
    local n = f.string(e.name)
    if n ~= "." and n ~= ".." then t[#t + 1] = n end
  end
  f.C.closedir(d)
  table.sort(t)
  return table.concat(t, " ")
end]]
local ls = assert(loadstring("return " .. LS))()

describe("a sandboxed worker's isolation", function()
  local strict, syscalls, snap

  setup(function()
    H.warm()
    strict = handler.pool({ sandbox = true, name = "attack_isolation_strict" })
    syscalls = handler.pool({ sandbox = "syscalls", name = "attack_isolation_syscalls" })
  end)

  teardown(function()
    strict:close()
    syscalls:close()
  end)

  before_each(function()
    snap = H.snapshot()
  end)

  after_each(function()
    H.assert_clean(snap, { strict, syscalls })
  end)

  -------------------------------------------------------------------------
  describe("privileges", function()
    it("no capabilities in any set, no_new_privs, and user 65534 when the host is root", function()
      local r = resolve(syscalls, function()
        local s = io.open("/proc/self/status"):read("*a")
        local out = {}
        for _, k in ipairs({ "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb" }) do
          out[#out + 1] = s:match(k .. ":%s*(%x+)")
        end
        return table.concat(out, ","), s:match("NoNewPrivs:%s*(%d+)"), s:match("Uid:%s*([%d%s]-)\n"),
          s:match("Gid:%s*([%d%s]-)\n"), s:match("Groups:%s*([%d ]*)")
      end)
      local caps, nnp, uid, gid, groups = ok_values(r)
      assert.are.equal(("0000000000000000,"):rep(4) .. "0000000000000000", caps)
      assert.are.equal("1", nnp)
      assert.are.equal("65534\t65534\t65534\t65534", uid)
      assert.are.equal("65534\t65534\t65534\t65534", gid)
      if is_root() then assert.are.equal("65534", (groups:gsub("%s+$", ""))) end
    end)
  end)

  -------------------------------------------------------------------------
  describe("processes", function()
    it("a job is pid 1 and the only process it can see; the host's pid names nothing", function()
      local host = H.getpid()
      local _, sup = H.workers()
      local r = resolve(syscalls, function()
        local f = require("ffi")
        pcall(f.cdef, "int getpid(void); int getppid(void);")
        local function exists(p)
          local h = io.open(p)
          if h then h:close() end
          return h ~= nil
        end
        return f.C.getpid(), f.C.getppid(), ls("/proc"), exists("/proc/" .. host .. "/status"),
          exists("/proc/" .. sup .. "/mem"), io.open("/proc/self/status"):read("*a"):match("NSpid:%s*([%d%s]-)\n")
      end)
      local pid, ppid, procs, host_seen, sup_seen, nspid = ok_values(r)
      assert.are.equal(1, pid)
      assert.are.equal(0, ppid)
      assert.are.equal("1 self thread-self", procs)
      assert.is_false(host_seen)
      assert.is_false(sup_seen)
      assert.are.equal("1", nspid)
    end)

    it("kill, ptrace, pidfd_open and process_vm_readv of the host's pid end the job", function()
      -- The filter kills on each before the namespace is asked; where it
      -- would not, the host's pid names no process in the job's namespace.
      local host = H.getpid()
      for _, body in ipairs({
        function()
          local f = require("ffi")
          pcall(f.cdef, "int kill(int pid, int sig);")
          return f.C.kill(host, 0)
        end,
        function()
          local f = require("ffi")
          pcall(f.cdef, "long ptrace(long req, int pid, void *a, void *d);")
          return tonumber(f.C.ptrace(16, host, nil, nil)) -- PTRACE_ATTACH
        end,
        function()
          local f = require("ffi")
          pcall(f.cdef, "long syscall(long n, ...);")
          return tonumber(f.C.syscall(434, f.cast("int", host), f.cast("int", 0))) -- pidfd_open
        end,
        function()
          local f = require("ffi")
          pcall(f.cdef, "long syscall(long n, ...);")
          return tonumber(f.C.syscall(310, f.cast("int", host), nil, f.cast("long", 0), nil,
            f.cast("long", 0), f.cast("long", 0))) -- process_vm_readv
        end,
      }) do
        local err = failure(resolve(syscalls, body), "SandboxViolation")
        assert.are.equal("SIGSYS", err.reason)
      end
    end)
  end)

  -------------------------------------------------------------------------
  describe("the file system", function()
    it("holds only the module directories, /dev's harmless nodes, /proc and /tmp", function()
      local r = resolve(syscalls, function()
        local m = io.open("/proc/self/mounts"):read("*a")
        local root_ro = m:match("^%S+ / %S+ (%S+)")
        local tmp_rw = m:match("\n%S+ /tmp %S+ (%S+)")
        return ls("/"), ls("/dev"), root_ro, tmp_rw, ls("/tmp"), ls("/etc")
      end)
      local root, dev, root_opts, tmp_opts, tmp, etc = ok_values(r)
      for name in root:gmatch("%S+") do
        assert.is_truthy(("dev etc proc tmp usr work"):find(name, 1, true) or
          package.path:find("/" .. name .. "/", 1, true), "unexpected /" .. name)
      end
      assert.are.equal("null random urandom zero", dev)
      assert.matches("^ro,", root_opts)
      assert.matches("^rw,", tmp_opts)
      -- Empty but for where module directories under the host's /tmp (a
      -- checkout there) are bound.
      for name in tmp:gmatch("%S+") do
        assert.is_truthy(package.path:find("/tmp/" .. name .. "/", 1, true),
          "unexpected /tmp/" .. name)
      end
      assert.is_truthy(etc == "" or etc == "localtime")
    end)

    it("the host's files are not there: /etc/passwd, the host's /tmp, its home", function()
      local dir = H.tmpdir()
      finally(function() H.rm_r(dir) end)
      H.write_file(dir .. "/secret", "host-only")
      local r = resolve(syscalls, function()
        local out = {}
        for _, p in ipairs({ "/etc/passwd", "/etc/shadow", dir .. "/secret", "/root", "/home" }) do
          local f, err = io.open(p)
          out[#out + 1] = f == nil and err:match("No such file") ~= nil
        end
        return unpack(out)
      end)
      assert.are.same({ true, true, true, true, true }, { ok_values(r) })
    end)

    it("require still finds Lua modules on package.path, in both profiles", function()
      for _, pool in ipairs({ strict, syscalls }) do
        local r = resolve(pool, function() return type(require("handler.errors").new) end)
        assert.are.equal("function", (ok_values(r)))
      end
    end)
  end)

  -------------------------------------------------------------------------
  describe("the network", function()
    it("an empty network namespace: lo alone", function()
      local r = resolve(syscalls, function()
        local names = {}
        for line in io.open("/proc/self/net/dev"):lines() do
          local n = line:match("^%s*([%w%.%-]+):")
          if n then names[#names + 1] = n end
        end
        return table.concat(names, ","), io.open("/proc/self/net/route"):read("*a"):match("\n") == nil
          or select(2, io.open("/proc/self/net/route"):read("*a"):gsub("\n", "")) == 1
      end)
      local names, no_routes = ok_values(r)
      assert.are.equal("lo", names)
      assert.is_true(no_routes)
    end)
  end)

  -------------------------------------------------------------------------
  describe("descriptors and the environment", function()
    it("a job holds 0, 1, 2 and 3 only; fd 0 is /dev/null", function()
      local r = resolve(syscalls, H.job_bodies().fds)
      assert.are.equal("0,1,2,3", (ok_values(r)))
      r = resolve(syscalls, function()
        local f = require("ffi")
        pcall(f.cdef, "long readlink(const char *p, char *b, unsigned long n);")
        local b = f.new("char[256]")
        local n = f.C.readlink("/proc/self/fd/0", b, 255)
        return f.string(b, n)
      end)
      assert.are.equal("/dev/null", (ok_values(r)))
    end)

    it("nothing of the host's environment: not in /proc/PID/environ, not in memory", function()
      local secret = format("hd-iso-secret-%d-%d", H.getpid(), os.time())
      local half = math.floor(#secret / 2)
      local out = H.run_host(PRELUDE .. [[
        ffi.cdef "int setenv(const char *k, const char *v, int o); int poll(void *f, unsigned long n, int ms);"
        ffi.C.setenv("HD_ISO_SECRET", ]] .. format("%q", secret) .. [[, 1)
        local handler = require("handler")
        local a, b = ]] .. format("%q, %q", secret:sub(1, half), secret:sub(half + 1)) .. [[
        -- The job looks for a followed by b in every readable mapping of
        -- its process, in slices: it never makes the whole string itself.
        local function scan()
          local f = require("ffi")
          local found, regions = 0, 0
          for line in io.open("/proc/self/maps"):lines() do
            local lo, hi, perm, name = line:match("^(%x+)%-(%x+) (%S+) %S+ %S+ %S+%s*(.*)$")
            lo, hi = tonumber(lo, 16), tonumber(hi, 16)
            if perm:sub(1, 1) == "r" and hi - lo <= 128 * 2^20 and not name:match("^%[v") then
              regions = regions + 1
              local step = 2^20
              for at = lo, hi - 1, step do
                local n = math.min(step + #a + #b, hi - at)
                local s = f.string(f.cast("const char *", at), n)
                local i = 1
                while true do
                  local p = s:find(a, i, true)
                  if p == nil then break end
                  if s:sub(p + #a, p + #a + #b - 1) == b then found = found + 1 end
                  i = p + 1
                end
              end
            end
          end
          return found, regions
        end
        -- Under AddressSanitizer reading every mapping is itself a report.
        local asan = (os.getenv("LD_PRELOAD") or ""):find("asan", 1, true)
        for _, sb in ipairs({ "syscalls", false }) do
          if asan then
            print("SCAN", tostring(sb), true, 0, 1)
          else
            local ok, found, regions = handler.run(scan, { sandbox = sb, max_heap_bytes = 256 * 2^20 })
            print("SCAN", tostring(sb), ok, found, regions)
          end
        end
        assert(handler.run(function() end))
        local p = handler._core.procs()
        local function environ(pid)
          local f = io.open("/proc/" .. pid .. "/environ")
          local s = f and f:read("*a") or "(unreadable)"
          if f then f:close() end
          return s
        end
        local sup = environ(p.supervisor)
        print("SUP-ENVIRON", #sup:gsub("%z", ""), sup:find("HD_ISO_SECRET", 1, true) ~= nil)
        local job = handler.pool({ sandbox = "syscalls" })
        local j = job:async(function() while true do end end, { max_ms = 5000 })
        local w
        for _ = 1, 200 do
          handler.step()
          w = handler._core.procs()[1]
          if w then break end
          ffi.C.poll(nil, 0, 10)
        end
        -- A worker's title may run on into the area (it is free now).
        print("WORKER-ENVIRON", w and environ(w):find("=", 1, true) ~= nil,
          w and environ(w):find("HD_ISO_SECRET", 1, true) ~= nil)
        job:kill_by_ref(j)
        job:close()
      ]])
      assert.is_falsy(out:find("Error", 1, true), out)
      assert.matches("SCAN\tsyscalls\ttrue\t0\t%d+", out)
      assert.matches("SCAN\tfalse\ttrue\t0\t%d+", out)
      assert.matches("SUP%-ENVIRON\t0\tfalse", out)
      assert.matches("WORKER%-ENVIRON\tfalse\tfalse", out)
    end)

    it("SysV IPC objects a job makes are its own: gone for the next job and never the host's",
      function()
        local key = 0x48440000 + H.getpid() % 0xFFFF
        local function shm(create)
          return function()
            local f = require("ffi")
            pcall(f.cdef, "int shmget(int key, size_t size, int flag); int *__errno_location(void);")
            local id = f.C.shmget(key, 4096, create and tonumber("1666", 8) or 0)
            return id, f.C.__errno_location()[0]
          end
        end
        local r = resolve(syscalls, shm(true))
        if not r[1] and r[2].type == "SandboxViolation" then
          -- The filter denies SysV IPC: nothing to share either way.
          return
        end
        local id = ok_values(r)
        assert.is_true(id >= 0)
        local again, err = ok_values(resolve(syscalls, shm(false)))
        assert.are.equal(-1, again)
        assert.are.equal(2, err) -- ENOENT
        local ffi = require("ffi")
        pcall(ffi.cdef, "int shmget(int key, size_t size, int flag);")
        assert.are.equal(-1, ffi.C.shmget(key, 0, 0))
      end)
  end)

  -------------------------------------------------------------------------
  describe("one job cannot reach another", function()
    it("a syscalls worker serves one job; a strict one is reused", function()
      -- A mark left in the process's C memory (its environment, which the
      -- restored Lua state does not reset) is never seen by a later job.
      local function marked()
        local ffi = require("ffi")
        pcall(ffi.cdef, "char *getenv(const char *); int setenv(const char *, const char *, int);")
        local seen = ffi.C.getenv("HANDLER_SPEC_MARK") ~= nil
        ffi.C.setenv("HANDLER_SPEC_MARK", "1", 1)
        return seen
      end
      local before = syscalls:stats().processes_started
      for _ = 1, 3 do assert.are.same({ false }, { ok_values(resolve(syscalls, marked)) }) end
      -- Three processes at least; one more may be the spare started for
      -- the next job.
      assert.is_true(syscalls:stats().processes_started - before >= 3)
      assert.is_true(ok_values(resolve(strict, function() return true end)))
      before = strict:stats().processes_started
      for _ = 1, 3 do assert.is_true(ok_values(resolve(strict, function() return true end))) end
      assert.are.equal(before, strict:stats().processes_started)
    end)

    it("a forged reply on fd 3 does not give the worker the next caller's job", function()
      local secret = format("victim-secret-%d-%d", H.getpid(), os.time())
      local out = H.run_host(PRELUDE .. [[
        local handler = require("handler")
        local pool = handler.pool({ sandbox = "syscalls", max_workers = 1 })
        local SECRET = ]] .. format("%q", secret) .. [[
        -- The attacker is the host's first job: its id is 1. It writes a
        -- whole reply for it (OK, no values) on fd 3, then reads the job
        -- pipe (fd 4) for what comes next, replies to that too (OK, no
        -- values), and prints what it read.
        local attacker = pool:async(function()
          local f = require("ffi")
          f.cdef [=[long write(int fd, const void *b, unsigned long n);
            long read(int fd, void *b, unsigned long n);
            typedef struct { int fd; short ev, rev; } iso_pfd; int poll(iso_pfd *p, unsigned long n, int ms);]=]
          local function reply(id)
            local le = {}
            for i = 0, 7 do le[#le + 1] = string.char(math.floor(id / 2^(8 * i)) % 256) end
            local m = "\2\0\0\0\2" .. table.concat(le) .. "\0\0"
            f.C.write(3, m, #m)
          end
          reply(1)
          local got, buf = {}, f.new("char[65536]")
          local p = f.new("iso_pfd[1]")
          p[0].fd, p[0].ev = 4, 1
          while f.C.poll(p, 1, 3000) > 0 do
            local n = tonumber(f.C.read(4, buf, 65536))
            if n <= 0 then break end
            got[#got + 1] = f.string(buf, n)
            local s = table.concat(got)
            if #s >= 13 then
              local id = 0
              for i = 13, 6, -1 do id = id * 256 + s:byte(i) end
              reply(id)
              break
            end
          end
          local s = table.concat(got)
          io.stdout:write("ATTACKER-READ " .. #s .. " [" .. s:gsub("[%c\128-\255]", ".") .. "]\n")
          io.stdout:flush()
          -- Its own reply must not reach the host with the forged one.
          f.C.poll(nil, 0, 300)
          return "genuine"
        end)
        local r = { attacker:await() }
        io.write(string.format("ATTACKER-RESULT\t%d\t%s\t%s\n", select("#", unpack(r)),
          tostring(r[1]), tostring(r[2])))
        local victim = pool:async(function() return SECRET:upper(), #SECRET end)
        local ok, v, n = victim:await()
        io.write(string.format("VICTIM\t%s\t%s\t%s\n", tostring(ok), tostring(v), tostring(n)))
        -- The attacker's process is gone by now or soon: it read EOF.
        pool:close()
      ]])
      -- The forgery was believed (its own job ended with what it wrote):
      -- the attack did what it could.
      assert.matches("ATTACKER%-RESULT\t1\ttrue\tnil", out)
      -- The next caller got its own right result...
      assert.matches("VICTIM\ttrue\t" .. secret:upper():gsub("%p", "%%%0") .. "\t" .. #secret, out)
      -- ...and the attacker saw nothing of it: it read nothing, or (the
      -- host kills a one-job worker once it has replied) was gone before
      -- it could say what it read.
      if out:find("ATTACKER-READ", 1, true) then assert.matches("ATTACKER%-READ 0 %[%]", out) end
      assert.is_nil(out:find(secret, 1, true))
    end)
  end)

  -------------------------------------------------------------------------
  describe("where namespaces cannot be had", function()
    it("a sandboxed job fails, naming why; an ordinary one still runs", function()
      local out = H.run_host([[
        local ffi = require("ffi")
        ffi.cdef "int setenv(const char *k, const char *v, int o);"
        ffi.C.setenv("HANDLER_TEST_NO_USERNS", "1", 1)
        local handler = require("handler")
        for _, sb in ipairs({ true, "syscalls" }) do
          local ok, err = handler.run(function() return 1 end, { sandbox = sb })
          print("SANDBOXED", tostring(sb), ok, err.type, err.message)
        end
        print("PLAIN", handler.run(function() return 42 end))
      ]])
      for _, sb in ipairs({ "true", "syscalls" }) do
        assert.matches("SANDBOXED\t" .. sb .. "\tfalse\tProcessExit\tProcess exited with cannot "
          .. "start a worker: a sandboxed worker needs namespaces of its own, and this system "
          .. "refused them", out, 1, true)
      end
      assert.matches("PLAIN\ttrue\t42", out, 1, true)
    end)
  end)

  -------------------------------------------------------------------------
  describe("a host that is not root", function()
    it("runs sandboxed jobs in a user namespace: user 65534, no capabilities, pid 1", function()
      if not is_root() then
        pending("needs root to become an unprivileged host")
        return
      end
      local out = H.run_host(PRELUDE .. [[
        ffi.cdef "int setgid(unsigned g); int setuid(unsigned u); int setgroups(unsigned long n, const unsigned *g);"
        assert(ffi.C.setgroups(0, nil) == 0 and ffi.C.setgid(65534) == 0 and ffi.C.setuid(65534) == 0)
        local handler = require("handler")
        local ok, s = handler.run(function()
          local st = io.open("/proc/self/status"):read("*a")
          return table.concat({ st:match("Uid:%s*(%d+)"), st:match("CapEff:%s*(%x+)"),
            st:match("CapBnd:%s*(%x+)"), st:match("NoNewPrivs:%s*(%d)"), st:match("NSpid:%s*(%d+)"),
            (io.open("/proc/self/uid_map"):read("*a"):gsub("^%s+", ""):gsub("%s+", " ")) }, " ")
        end, { sandbox = "syscalls" })
        print("UNPRIVILEGED", ok, s)
        local ok2, v = handler.run(function() return require("handler.errors") ~= nil end,
          { sandbox = true })
        print("STRICT", ok2, v)
        -- An ordinary worker of the same user cannot read the supervisor's
        -- memory: the supervisor is not dumpable.
        local ok3, m = handler.run(function()
          local f = require("ffi")
          f.cdef "int getppid(void);"
          local h, err = io.open("/proc/" .. f.C.getppid() .. "/mem")
          if h then h:close() return "opened" end
          return err
        end)
        print("SUPMEM", ok3, m)
      ]])
      assert.matches("UNPRIVILEGED\ttrue\t65534 0000000000000000 0000000000000000 1 1 " ..
        "65534 65534 1 ", out, 1, true)
      assert.matches("STRICT\ttrue\ttrue", out, 1, true)
      assert.matches("SUPMEM\ttrue\t[^\n]*Permission denied", out)
    end)
  end)
end)
