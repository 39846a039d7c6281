-- attack_filter_spec.lua: attacks on the sandbox. The system call filter is
-- an allow-list: every system call number of this architecture that is not
-- on it (`handler-worker --sandbox-allowlist`) is tried from a
-- sandbox = "syscalls" job through the FFI and must end the job as a
-- SandboxViolation; the calls allowed with their arguments checked are tried
-- with the arguments that matter (the host's pid, write flags, shared
-- memory, the host's stdout), the ones that could hurt the host from a
-- disposable host. The strict profile (sandbox = true) is attacked through
-- the FFI that cdata literals load, string.buffer's pointers and bytecode on
-- package.path. After every test: nothing leaked and every pool is idle.
local handler = require("handler")
local H = require("spec.support.helpers")
local ffi = require("ffi")

local format, concat, tostring, tonumber, ipairs, pairs, type =
  string.format, table.concat, tostring, tonumber, ipairs, pairs, type

local function cdef(s)
  pcall(ffi.cdef, s)
end
cdef [[void hd_attack_free(void *p) __asm__("free");]]
cdef [[int seccomp_syscall_resolve_name(const char *name);
  char *seccomp_syscall_resolve_num_arch(uint32_t arch, int num);]]
local seccomp = ffi.load("libseccomp.so.2")
-- SCMP_ARCH_NATIVE
local NATIVE = 0

-- The number of a system call on this architecture, or nil when it has none.
local function nr_of(name)
  local n = seccomp.seccomp_syscall_resolve_name(name)
  return n >= 0 and n or nil
end

-- Calls the kernel lets through every filter (seccomp_uprobe_exception):
-- from anywhere but a uprobe's trampoline, uretprobe raises SIGILL and
-- uprobe fails with ENXIO. Older kernels lack them: the filter kills then.
local EXEMPT = jit.arch == "x64" and {
  [335] = { name = "uretprobe", outcome = "ProcessExit: Process exited with SIGILL" },
  [336] = { name = "uprobe", outcome = "returned -1 (errno 6)" },
} or {}

-- The name libseccomp knows for a number, or "#<number>".
local function name_of(n)
  local p = seccomp.seccomp_syscall_resolve_num_arch(NATIVE, n)
  if p == nil then return "#" .. n end
  local s = ffi.string(p)
  ffi.C.hd_attack_free(p)
  return s
end

local function worker_path()
  return handler._core.worker_path
end

local function allowlist()
  local p = io.popen(H.shell_quote(worker_path()) .. " --sandbox-allowlist")
  local set, n = {}, 0
  for line in p:lines() do
    set[line] = true
    n = n + 1
  end
  p:close()
  return set, n
end

-- Constants shared by x86-64 and arm64 (asm-generic), but O_TMPFILE.
local K = {
  O_WRONLY = 1, O_RDWR = 2, O_CREAT = 0x40, O_TRUNC = 0x200, O_APPEND = 0x400,
  O_NONBLOCK = 0x800, O_ASYNC = 0x2000,
  O_TMPFILE = jit.arch == "arm64" and 0x404000 or 0x410000,
  O_DIRECTORY = jit.arch == "arm64" and 0x4000 or 0x10000,
  F_DUPFD = 0, F_SETFL = 4, F_SETLK = 6, F_SETOWN = 8, F_SETSIG = 10, F_GETFL = 3,
  PROT_RW = 3, MAP_SHARED = 1, MAP_PRIVATE = 2, MAP_SHARED_VALIDATE = 3, MAP_ANONYMOUS = 0x20,
  TCGETS = 0x5401, TIOCSTI = 0x5412, FIONBIO = 0x5421,
  RLIMIT_DATA = 2, RLIMIT_NOFILE = 7, AT_FDCWD = -100, IPC_CREAT = 512,
  AF_UNIX = 1, AF_INET = 2, SOCK_STREAM = 1, SIGKILL = 9, ENOSYS = 38, EPERM = 1,
}

-- A job calling system call nr with up to six integer arguments through the
-- FFI; it returns what the call returned and errno.
local function sys(nr, ...)
  local a = { ... }
  return function()
    local f = require("ffi")
    pcall(f.cdef, "long syscall(long n, long a, long b, long c, long d, long e, long g);")
    local r = f.C.syscall(nr, a[1] or 0, a[2] or 0, a[3] or 0, a[4] or 0, a[5] or 0, a[6] or 0)
    return tonumber(r), f.errno()
  end
end

-- "SandboxViolation", or what else the job ended with.
local function outcome(ok, a, b)
  if ok then return format("returned %s (errno %s)", tostring(a), tostring(b)) end
  if type(a) ~= "table" then return "failed with " .. tostring(a) end
  if a.type == "SandboxViolation" then return a.type end
  return a.type .. ": " .. tostring(a.message)
end

-- Runs every case ({ name, fn }) in pool at once and returns the outcome of
-- each by name.
local function run_all(pool, cases)
  local jobs = {}
  for i, c in ipairs(cases) do
    jobs[i] = assert(pool:async(c[2], { pool_timeout = 120000, max_ms = 10000 }))
  end
  local out = {}
  for i, c in ipairs(cases) do out[c[1]] = outcome(jobs[i]:await()) end
  return out
end

-- Asserts that every case ended as a SandboxViolation (or as its third
-- field says, for a call the kernel exempts), naming all that did not.
local function assert_violations(pool, cases)
  local got, bad = run_all(pool, cases), {}
  for _, c in ipairs(cases) do
    local g = got[c[1]]
    if g ~= "SandboxViolation" and g ~= c[3] then bad[#bad + 1] = c[1] .. ": " .. g end
  end
  assert(#bad == 0, #bad .. " of " .. #cases .. " not refused:\n  " .. concat(bad, "\n  "))
end

local function violation(ok, err)
  assert.is_false(ok, "the job returned " .. tostring(err))
  assert.are.equal("SandboxViolation", err.type, tostring(err.message))
  assert.are.equal("SIGSYS", err.reason)
end

describe("the system call filter", function()
  local pool, snap

  setup(function()
    H.warm()
    pool = handler.pool({ sandbox = "syscalls", max_workers = 4 })
  end)

  teardown(function()
    pool:close()
  end)

  before_each(function()
    snap = H.snapshot()
  end)

  after_each(function()
    local ok, v = pool:run(function() return 1 + 1 end)
    assert.is_true(ok, tostring(v))
    assert.are.equal(2, v)
    H.assert_clean(snap, { pool })
  end)

  it("is an allow-list that `handler-worker --sandbox-allowlist` prints", function()
    local set, n = allowlist()
    -- What LuaJIT and the worker need, and not much more.
    for _, name in ipairs({ "read", "write", "mmap", "munmap", "mprotect", "openat", "close",
      "futex", "exit_group", "prlimit64", "sched_getaffinity" }) do
      assert.is_true(set[name], name .. " is not allowed")
    end
    for _, name in ipairs({ "socket", "connect", "clone", "clone3", "execve", "fork", "ptrace",
      "openat2", "ftruncate", "setpriority", "shmget", "vhangup", "pidfd_send_signal",
      "process_vm_writev", "io_uring_setup", "bpf", "memfd_create", "pwrite64", "dup",
      "dup2", "dup3", "flock", "select", "epoll_create1", "pipe2", "sendto", "recvfrom",
      "shutdown", "sched_setaffinity" }) do
      assert.is_nil(set[name], name .. " is allowed")
    end
    assert.is_true(n > 30 and n < 90, n .. " calls allowed")
  end)

  describe("kills a job making any system call not on the list", function()
    -- Every number up to past the newest the kernel has (unnamed ones too:
    -- an allow-list refuses calls younger than libseccomp's table), and
    -- on x86-64 the x32 ABI's numbers of allowed calls.
    local MAX = 600
    local cases
    local function cases_in(from, to)
      if cases == nil then
        local allowed = allowlist()
        cases = {}
        for n = 0, MAX do
          local name = name_of(n)
          if not allowed[name] and name ~= "openat2" then
            cases[#cases + 1] = { n = n, name = EXEMPT[n] and EXEMPT[n].name or name,
              exempt = EXEMPT[n] and EXEMPT[n].outcome }
          end
        end
      end
      local out = {}
      for _, c in ipairs(cases) do
        if c.n >= from and c.n <= to then
          out[#out + 1] = { format("%s (%d)", c.name, c.n), sys(c.n), c.exempt }
        end
      end
      return out
    end

    for from = 0, 600, 100 do
      it(format("numbers %d to %d", from, from + 99), function()
        local batch = cases_in(from, math.min(from + 99, MAX))
        assert_violations(pool, batch)
      end)
    end

    it("numbers far past the table", function()
      assert_violations(pool, { { "1000", sys(1000) }, { "4095", sys(4095) },
        { "0x3fffffff", sys(0x3fffffff) }, { "-1", sys(-1) } })
    end)

    if jit.arch == "x64" then
      it("the x32 ABI's getpid, read and write; int 0x80's getpid", function()
        local x32 = 0x40000000
        assert_violations(pool, {
          { "x32 getpid", sys(x32 + nr_of("getpid")) },
          { "x32 read", sys(x32 + nr_of("read"), 0, 0, 0) },
          { "x32 write", sys(x32 + nr_of("write"), 1, 0, 0) },
          -- The i386 ABI through int 0x80 (mov eax, 20: getpid; int 0x80;
          -- ret), from an executable private page.
          { "int 0x80 getpid", function()
            local f = require("ffi")
            pcall(f.cdef, [[void *mmap(void *a, size_t n, int p, int fl, int fd, long off);]])
            local page = f.C.mmap(nil, 4096, 7, 0x22, -1, 0)
            local code = "\184\20\0\0\0\205\128\195"
            f.copy(page, code, #code)
            return f.cast("int (*)(void)", page)()
          end },
        })
      end)
    end
  end)


  describe("checks the arguments that matter", function()
    local dir

    before_each(function()
      dir = H.visible_tmpdir()
    end)

    after_each(function()
      H.rm_r(dir)
    end)

    -- Runs `cases` (the source of a list of { name, job } in which `host`
    -- is the disposable host's pid, NR[name] a system call's number and
    -- sys(nr, ...) makes a job as above) in a disposable host, one after the
    -- other in a sandbox = "syscalls" pool, and returns what it printed:
    -- "<name>: <error type>" or "<name>: returned ...", then whether the
    -- state the jobs must not change (its priority, its stdout's flags,
    -- its limits) is untouched, then "host survived". Its stdout is a file.
    local function host_run(cases)
      local names = {}
      for name in cases:gmatch('NR%.([%w_]+)') do names[#names + 1] = format("%q", name) end
      return H.run_host([==[
        local handler = require("handler")
        local ffi = require("ffi")
        ffi.cdef [[
          int getpid(void);
          int getpriority(int which, unsigned who);
          int fcntl(int fd, int cmd, ...);
          struct hd_rl { unsigned long cur, max; };
          int getrlimit(int res, struct hd_rl *r);
          int seccomp_syscall_resolve_name(const char *name);
        ]]
        local sc = ffi.load("libseccomp.so.2")
        local NR = {}
        for _, name in ipairs({ ]==] .. concat(names, ", ") .. [==[ }) do
          NR[name] = sc.seccomp_syscall_resolve_name(name)
        end
        local C = ffi.C
        local host = C.getpid()
        io.stdout:setvbuf("no")
        print("before the jobs")
        local function state()
          local rl, out = ffi.new("struct hd_rl"), {}
          out[1] = C.getpriority(0, 0)
          out[2] = C.fcntl(1, 3)
          for _, res in ipairs({ 2, 7 }) do
            C.getrlimit(res, rl)
            out[#out + 1] = tostring(rl.cur) .. "/" .. tostring(rl.max)
          end
          return table.concat(out, " ")
        end
        local function sys(n, ...)
          local a = { ... }
          return function()
            local f = require("ffi")
            pcall(f.cdef, "long syscall(long n, long a, long b, long c, long d, long e, long g);")
            local r = f.C.syscall(n, a[1] or 0, a[2] or 0, a[3] or 0, a[4] or 0, a[5] or 0,
              a[6] or 0)
            return tonumber(r), f.errno()
          end
        end
        local pool = handler.pool({ sandbox = "syscalls" })
        local before = state()
        local cases = { ]==] .. cases .. [==[ }
        for _, c in ipairs(cases) do
          local ok, a, b = pool:run(c[2])
          if ok then
            print(c[1] .. ": returned " .. tostring(a) .. " errno " .. tostring(b))
          else
            print(c[1] .. ": " .. tostring(a.type))
          end
        end
        local after = state()
        print("host state: " .. (before == after and "untouched" or (before .. " -> " .. after)))
        pool:close()
        print("host survived")
      ]==])
    end

    -- Asserts that the disposable host's output shows each case refused,
    -- and the host untouched and alive.
    local function assert_host_fine(out, names)
      local want = { "before the jobs" }
      for _, name in ipairs(names) do want[#want + 1] = name .. ": SandboxViolation" end
      want[#want + 1] = "host state: untouched"
      want[#want + 1] = "host survived"
      H.assert_has_all(out, want)
    end

    it("signals to the host: kill, tkill, tgkill, rt_sigqueueinfo, rt_tgsigqueueinfo", function()
      local out = host_run([[
        { "kill", sys(NR.kill, host, 9) },
        { "kill -1", sys(NR.kill, -1, 0) },
        { "kill 0", sys(NR.kill, 0, 0) },
        { "tkill", sys(NR.tkill, host, 9) },
        { "tgkill", sys(NR.tgkill, host, host, 9) },
        { "rt_sigqueueinfo", function()
          local f = require("ffi")
          pcall(f.cdef, "long syscall(long n, long a, long b, void *c);")
          local info = f.new("int[32]")
          info[0], info[2] = 9, -1 -- si_signo SIGKILL, si_code SI_QUEUE
          return tonumber(f.C.syscall(NR.rt_sigqueueinfo, host, 9, info)), f.errno()
        end },
        { "rt_tgsigqueueinfo", function()
          local f = require("ffi")
          pcall(f.cdef, "long syscall(long n, long a, long b, long c, void *d);")
          local info = f.new("int[32]")
          info[0], info[2] = 9, -1
          return tonumber(f.C.syscall(NR.rt_tgsigqueueinfo, host, host, 9, info)), f.errno()
        end },
      ]])
      assert_host_fine(out, { "kill", "kill -1", "kill 0", "tkill", "tgkill", "rt_sigqueueinfo",
        "rt_tgsigqueueinfo" })
    end)

    it("limits and priorities: prlimit64 and setpriority on the host, others of its own",
      function()
        local out = host_run([[
          { "prlimit64 get host", function()
            local f = require("ffi")
            pcall(f.cdef, "long syscall(long n, long a, long b, void *c, void *d);")
            local rl = f.new("unsigned long[2]")
            return tonumber(f.C.syscall(NR.prlimit64, host, 7, nil, rl)), f.errno()
          end },
          { "prlimit64 set host", function()
            local f = require("ffi")
            pcall(f.cdef, "long syscall(long n, long a, long b, void *c, void *d);")
            local rl = f.new("unsigned long[2]", 1, 1)
            return tonumber(f.C.syscall(NR.prlimit64, host, 7, rl, nil)), f.errno()
          end },
          { "prlimit64 set own NOFILE", function()
            local f = require("ffi")
            pcall(f.cdef, "long syscall(long n, long a, long b, void *c, void *d);")
            local rl = f.new("unsigned long[2]", 8, 8)
            return tonumber(f.C.syscall(NR.prlimit64, 0, 7, rl, nil)), f.errno()
          end },
          { "setpriority host", sys(NR.setpriority, 0, host, 19) },
          { "setpriority own", sys(NR.setpriority, 0, 0, 19) },
          { "sched_setscheduler host", sys(NR.sched_setscheduler, host, 0, 0) },
          { "sched_setattr host", sys(NR.sched_setattr, host, 0, 0) },
          { "sched_setaffinity host", sys(NR.sched_setaffinity, host, 0, 0) },
        ]])
        assert_host_fine(out, { "prlimit64 get host", "prlimit64 set host",
          "prlimit64 set own NOFILE", "setpriority host", "setpriority own",
          "sched_setscheduler host", "sched_setattr host", "sched_setaffinity host" })
      end)

    it("the host's stdout: ftruncate, fallocate, lseek, F_DUPFD, F_SETFL, F_SETOWN, FIONBIO",
      function()
        local out = host_run([[
          { "ftruncate stdout", sys(NR.ftruncate, 1, 0) },
          { "fallocate stdout", sys(NR.fallocate, 1, 0, 0, 4096) },
          { "lseek stdout", sys(NR.lseek, 1, 0, 0) },
          { "F_DUPFD stdout", sys(NR.fcntl, 1, 0, 5) },
          { "dup stdout", sys(NR.dup, 1) },
          { "F_SETFL O_NONBLOCK", sys(NR.fcntl, 1, 4, 0x800) },
          { "F_SETFL O_ASYNC", sys(NR.fcntl, 1, 4, 0x2000) },
          { "F_SETOWN", sys(NR.fcntl, 1, 8, host) },
          { "F_SETSIG", sys(NR.fcntl, 1, 10, 9) },
          { "FIONBIO", function()
            local f = require("ffi")
            pcall(f.cdef, "long syscall(long n, long a, long b, int *c);")
            return tonumber(f.C.syscall(NR.ioctl, 1, 0x5421, f.new("int[1]", 1))), f.errno()
          end },
          { "FIOASYNC", function()
            local f = require("ffi")
            pcall(f.cdef, "long syscall(long n, long a, long b, int *c);")
            return tonumber(f.C.syscall(NR.ioctl, 1, 0x5452, f.new("int[1]", 1))), f.errno()
          end },
        ]])
        assert_host_fine(out, { "ftruncate stdout", "fallocate stdout", "lseek stdout",
          "F_DUPFD stdout", "dup stdout", "F_SETFL O_NONBLOCK", "F_SETFL O_ASYNC", "F_SETOWN",
          "F_SETSIG", "FIONBIO", "FIOASYNC" })
      end)

    it("openat2 answers ENOSYS, even for /proc/<host>/mem read-write", function()
      local host, n = H.getpid(), nr_of("openat2")
      if n == nil then return end
      local ok, r, errno = pool:run(function()
        local f = require("ffi")
        pcall(f.cdef, [[struct hd_open_how { uint64_t flags, mode, resolve; };
          long syscall(long n, long dirfd, const char *path, void *how, long size);]])
        local how = f.new("struct hd_open_how", 2, 0, 0) -- O_RDWR
        return tonumber(f.C.syscall(n, -100, "/proc/" .. host .. "/mem", how, 24)), f.errno()
      end)
      assert.is_true(ok, tostring(r))
      assert.are.equal(-1, r)
      assert.are.equal(K.ENOSYS, errno)
      -- The C library then falls back to openat, whose flags are checked.
      violation(pool:run(function() return io.open("/proc/" .. host .. "/mem", "r+") end))
    end)

    it("opening to write, create, truncate or append, or O_TMPFILE", function()
      local path = dir .. "/f"
      H.write_file(path, "keep")
      local openat = nr_of("openat")
      local function at(p, flags)
        return function()
          local f = require("ffi")
          pcall(f.cdef, "long syscall(long n, long dirfd, const char *path, long fl, long m);")
          return tonumber(f.C.syscall(openat, -100, p, flags, 384)), f.errno()
        end
      end
      local cases = {
        { "O_WRONLY", at(path, K.O_WRONLY) }, { "O_RDWR", at(path, K.O_RDWR) },
        { "O_CREAT", at(dir .. "/new", K.O_CREAT) },
        { "O_CREAT|O_WRONLY", at(dir .. "/new", K.O_CREAT + K.O_WRONLY) },
        { "O_TRUNC", at(path, K.O_TRUNC) }, { "O_APPEND", at(path, K.O_APPEND) },
        { "O_TMPFILE", at(dir, K.O_TMPFILE + K.O_RDWR) },
      }
      local open = nr_of("open")
      if open then
        local p, creat = dir .. "/new", K.O_CREAT
        cases[#cases + 1] = { "open O_CREAT", function()
          local f = require("ffi")
          pcall(f.cdef, "long syscall(long n, const char *path, long fl, long m);")
          return tonumber(f.C.syscall(open, p, creat, 384)), f.errno()
        end }
      end
      assert_violations(pool, cases)
      assert.are.equal("keep", H.read_file(path))
      assert.is_false(H.exists(dir .. "/new"))
      -- Read-only opens, of directories too, work.
      local ok, fd = pool:run(at(path, 0))
      assert.is_true(ok, tostring(fd))
      assert.is_true(fd >= 0)
      ok, fd = pool:run(at(dir, K.O_DIRECTORY))
      assert.is_true(ok, tostring(fd))
      assert.is_true(fd >= 0)
    end)

    it("shared memory: MAP_SHARED|MAP_ANONYMOUS of 1 GiB, SysV shmget, msgget, semget",
      function()
        local function count(file)
          local n = 0
          for _ in (H.read_file(file) or ""):gmatch("\n") do n = n + 1 end
          return n
        end
        local function sysv()
          return { count("/proc/sysvipc/shm"), count("/proc/sysvipc/msg"),
            count("/proc/sysvipc/sem") }
        end
        local before = sysv()
        local mmap = nr_of("mmap")
        assert_violations(pool, {
          { "MAP_SHARED 1 GiB", sys(mmap, 0, 2^30, K.PROT_RW, K.MAP_SHARED + K.MAP_ANONYMOUS,
            -1, 0) },
          { "MAP_SHARED_VALIDATE", sys(mmap, 0, 4096, K.PROT_RW,
            K.MAP_SHARED_VALIDATE + K.MAP_ANONYMOUS, -1, 0) },
          { "shmget", sys(nr_of("shmget"), 0, 2^30, K.IPC_CREAT + 384) },
          { "msgget", sys(nr_of("msgget"), 0, K.IPC_CREAT + 384) },
          { "semget", sys(nr_of("semget"), 0, 1, K.IPC_CREAT + 384) },
        })
        assert.are.same(before, sysv())
        -- Private memory is what LuaJIT uses, and it works.
        local ok, p = pool:run(sys(mmap, 0, 2^20, K.PROT_RW, K.MAP_PRIVATE + K.MAP_ANONYMOUS,
          -1, 0))
        assert.is_true(ok, tostring(p))
        assert.is_true(p > 0)
      end)

    it("terminals and sessions: TIOCSTI, vhangup, setsid", function()
      local ioctl = nr_of("ioctl")
      assert_violations(pool, {
        { "TIOCSTI", function()
          local f = require("ffi")
          pcall(f.cdef, "long syscall(long n, long a, long b, const char *c);")
          return tonumber(f.C.syscall(ioctl, 0, 0x5412, "x")), f.errno()
        end },
        { "vhangup", sys(nr_of("vhangup")) },
        { "setsid", sys(nr_of("setsid")) },
      })
      -- What isatty asks is allowed.
      local ok, r = pool:run(sys(ioctl, 1, K.TCGETS, 0))
      assert.is_true(ok, tostring(r))
    end)

    it("the network: socket, socketpair, connect, sendto with an address or to stdout",
      function()
        assert_violations(pool, {
          { "socket AF_INET", sys(nr_of("socket"), K.AF_INET, K.SOCK_STREAM, 0) },
          { "socket AF_UNIX", sys(nr_of("socket"), K.AF_UNIX, K.SOCK_STREAM, 0) },
          { "socketpair", sys(nr_of("socketpair"), K.AF_UNIX, K.SOCK_STREAM, 0, 0) },
          { "connect on the reply pipe", sys(nr_of("connect"), 3, 0, 0) },
          { "sendto with an address", sys(nr_of("sendto"), 3, 0, 0, 0, 1, 16) },
          { "sendto stdout", sys(nr_of("sendto"), 1, 0, 0, 0, 0, 0) },
          { "recvfrom stdin", sys(nr_of("recvfrom"), 0, 0, 0, 0, 0, 0) },
          { "sendmsg", sys(nr_of("sendmsg"), 3, 0, 0) },
          { "shutdown", sys(nr_of("shutdown"), 3, 0) },
        })
      end)

    it("vmsplice only to the reply pipe; sched_getaffinity only of itself", function()
      assert_violations(pool, {
        { "vmsplice to stdout", sys(nr_of("vmsplice"), 1, 0, 0, 0) },
        { "vmsplice to the job pipe", sys(nr_of("vmsplice"), 4, 0, 0, 0) },
        { "sched_getaffinity of pid 1", sys(nr_of("sched_getaffinity"), 1, 0, 0) },
      })
      -- Of itself it answers (here EFAULT: the mask's address is 0).
      local ok, r = pool:run(sys(nr_of("sched_getaffinity"), 0, 0, 0))
      assert.is_true(ok, tostring(r))
    end)

    it("locks: F_SETLK, flock", function()
      assert_violations(pool, {
        { "F_SETLK", sys(nr_of("fcntl"), 0, K.F_SETLK, 0) },
        { "flock", sys(nr_of("flock"), 0, 2) },
      })
    end)
  end)

  it("keeps the host's /proc/<pid>/mem and environ from a job of the host's own user", function()
    -- Run as root, the host's capabilities already keep them from a worker
    -- that dropped its own: the disposable host then runs as nobody, and
    -- what is tested is the worker's Landlock domain.
    local out = H.run_host_as_nobody([[
      local handler = require("handler")
      local ffi = require("ffi")
      ffi.cdef "int getpid(void);"
      local host = ffi.C.getpid()
      local function peek()
        local out = {}
        for _, what in ipairs({ "mem", "environ", "maps" }) do
          local f = io.open("/proc/" .. host .. "/" .. what)
          out[#out + 1] = what .. (f and " open" or " refused")
          if f then f:close() end
        end
        return table.concat(out, ", ")
      end
      for _, sandbox in ipairs({ "syscalls", false }) do
        local ok, v = handler.run(peek, { sandbox = sandbox })
        print(tostring(sandbox) .. ": " .. tostring(ok and v or v.type))
      end
    ]])
    assert.matches("syscalls: mem refused, environ refused, maps refused", out, 1, true)
    -- Without the sandbox they are open (unless something else, such as
    -- Yama, closes them): the attack is real.
    assert.matches("false: ", out, 1, true)
  end)

  describe("allows what jobs and the worker need", function()
    it("files, time, modules, the JIT, its own signals and limits", function()
      local dir = H.visible_tmpdir()
      finally(function() H.rm_r(dir) end)
      H.write_file(dir .. "/mod_attack_ok.lua", "return { v = 'module' }")
      H.write_file(dir .. "/data", "data")
      local mods, data = dir .. "/?.lua", dir .. "/data"
      local ok, a, b, c, d, e = pool:run(function()
        package.path = mods
        local f = assert(io.open(data))
        local s = f:read("*a")
        f:seek("set", 0)
        f:close()
        local ffi = require("ffi")
        ffi.cdef [[int kill(int pid, int sig); int getpid(void); int isatty(int fd);
          struct hd_rl { unsigned long cur, max; }; int getrlimit(int r, struct hd_rl *o);
          int fcntl(int fd, int cmd, ...);]]
        local rl = ffi.new("struct hd_rl")
        local sum = 0
        for i = 1, 1e5 do sum = sum + i % 7 end
        ffi.C.isatty(1)
        return s .. " " .. require("mod_attack_ok").v,
          os.date("%Y") + 0 > 2000 and os.clock() >= 0, ffi.C.kill(ffi.C.getpid(), 0),
          ffi.C.getrlimit(7, rl) == 0 and tonumber(rl.max), ffi.C.fcntl(1, 3) >= 0 and sum
      end)
      assert.is_true(ok, tostring(a))
      assert.are.equal("data module", a)
      assert.is_true(b)
      assert.are.equal(0, c)
      assert.are.equal(16, d)
      assert.is_number(e)
    end)

    it("an abort is the job's own signal death, not a violation", function()
      local ok, err = pool:run(function()
        local ffi = require("ffi")
        ffi.cdef "void abort(void);"
        ffi.C.abort()
      end)
      assert.is_false(ok)
      assert.are.equal("ProcessExit", err.type)
      -- A sandboxed worker is pid 1 of its PID namespace, where the kernel
      -- ignores the job's own SIGABRT: abort() then ends in the fault it
      -- forces, SIGSEGV (SECURITY.md, "What a sandboxed worker can see").
      assert.is_true(err.reason == "SIGABRT" or err.reason == "SIGSEGV", tostring(err.reason))
    end)

    it("raising its RLIMIT_DATA fails with EPERM: the worker holds no capability", function()
      local prlimit = nr_of("prlimit64")
      local ok, r, errno, same, caps = pool:run(function()
        local f = require("ffi")
        pcall(f.cdef, "long syscall(long n, long a, long b, void *c, void *d);")
        local old, now = f.new("uint64_t[2]"), f.new("uint64_t[2]")
        f.C.syscall(prlimit, 0, 2, nil, old)
        -- Sanitized builds set no RLIMIT_DATA: it is lowered first, which
        -- is allowed.
        if old[1] == 0xffffffffffffffffULL then
          old[0], old[1] = 2^40, 2^40
          f.C.syscall(prlimit, 0, 2, old, nil)
        end
        local new = f.new("uint64_t[2]", old[1] + 4096, old[1] + 4096)
        local r, errno = tonumber(f.C.syscall(prlimit, 0, 2, new, nil)), f.errno()
        f.C.syscall(prlimit, 0, 2, nil, now)
        local st = io.open("/proc/self/status"):read("*a")
        return r, errno, old[1] == now[1], st:match("CapEff:%s*(%x+)")
      end)
      assert.is_true(ok, tostring(r))
      assert.are.equal(-1, r)
      assert.are.equal(K.EPERM, errno)
      assert.is_true(same)
      assert.are.equal(0, tonumber(caps, 16))
    end)
  end)
end)

describe("the strict profile (sandbox = true)", function()
  local strict, snap, dir

  setup(function()
    H.warm()
    strict = handler.pool({ sandbox = true })
  end)

  teardown(function()
    strict:close()
  end)

  before_each(function()
    dir = H.visible_tmpdir()
    snap = H.snapshot()
  end)

  after_each(function()
    H.rm_r(dir)
    local ok, v = strict:run(function() return 1 + 1 end)
    assert.is_true(ok, tostring(v))
    assert.are.equal(2, v)
    H.assert_clean(snap, { strict })
  end)

  -- What a job sees of the FFI: whether package.loaded.ffi is set, whether
  -- require("ffi") works, and package.preload.ffi.
  local function ffi_seen()
    return package.loaded.ffi ~= nil, (pcall(require, "ffi")), package.preload.ffi ~= nil
  end

  it("a cdata literal in the closure does not bring the FFI back", function()
    local seen = ffi_seen
    local ok, t, loaded, req, pre = strict:run(function()
      local x = 1LL + 0x10ULL
      return type(x), seen()
    end)
    assert.is_true(ok, tostring(t))
    assert.are.equal("cdata", t)
    assert.is_false(loaded, "package.loaded.ffi is set")
    assert.is_false(req, "require('ffi') works")
    assert.is_false(pre, "package.preload.ffi is set")
  end)

  it("nor does one in loaded text, nor an imaginary one", function()
    local seen = ffi_seen
    local ok, t, loaded, req, pre = strict:run(function()
      local x = load("return 1LL, 2i")()
      local y = loadstring("return 3ULL")()
      return type(x) .. type(y), seen()
    end)
    assert.is_true(ok, tostring(t))
    assert.are.equal("cdatacdata", t)
    assert.is_false(loaded, "package.loaded.ffi is set")
    assert.is_false(req, "require('ffi') works")
    assert.is_false(pre, "package.preload.ffi is set")
  end)

  it("has no string.buffer (its reserve and ref hand out pointers), nor thread.exdata", function()
    local ok, a, b, c, d = strict:run(function()
      local x = 1LL -- the FFI's C types exist, a buffer would have made pointers
      return (pcall(require, "string.buffer")), package.preload["string.buffer"] ~= nil,
        (pcall(require, "thread.exdata")), type(x)
    end)
    assert.is_true(ok, tostring(a))
    assert.is_false(a, "require('string.buffer') works")
    assert.is_false(b)
    assert.is_false(c, "require('thread.exdata') works")
    assert.are.equal("cdata", d)
  end)

  it("loads no bytecode through require and package.path; text modules load", function()
    H.write_file(dir .. "/attack_bc.lua", string.dump(function() return "bytecode ran" end))
    H.write_file(dir .. "/attack_text.lua", "return 'text ran'")
    local path = dir .. "/?.lua"
    local ok, bc_ok, bc, text = strict:run(function()
      package.path = path
      local a, b = pcall(require, "attack_bc")
      return a, b, require("attack_text")
    end)
    assert.is_true(ok, tostring(bc_ok))
    assert.is_false(bc_ok, "bytecode loaded: " .. tostring(bc))
    assert.matches("attack_bc", bc, 1, true)
    assert.matches("mode", bc, 1, true)
    assert.are.equal("text ran", text)
    -- A module that is not there is reported as require always did.
    local ok2, err = strict:run(function()
      package.path = path
      return select(2, pcall(require, "attack_none"))
    end)
    assert.is_true(ok2)
    assert.matches("module 'attack_none' not found", err, 1, true)
    assert.matches("no file '" .. dir .. "/attack_none.lua'", err, 1, true)
  end)

  -- A value a job returns that is in package.loaded travels by name, and the
  -- host decodes a name by looking it up in its own package.loaded: a job
  -- returning _G, package.loaded, debug or os hands the caller the host's
  -- own table. The worker cannot be the one to refuse (a "syscalls" job
  -- writes any bytes to its socket); the decoder of a reply from a
  -- sandboxed pool must refuse named tables and userdata (see SECURITY.md).
  it("cannot hand the caller the host's _G, package.loaded, debug or os", function()
    local jobs = {
      _G = function() return _G end,
      loaded = function() return package.loaded end,
      debug = function() return debug end,
      os = function() return os end,
    }
    local host = { _G = _G, loaded = package.loaded, debug = debug, os = os }
    for name, job in pairs(jobs) do
      local ok, v = strict:run(job)
      assert.is_false(ok and v == host[name], "the caller got the host's own " .. name)
    end
  end)
end)
