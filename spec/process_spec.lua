-- spec/process_spec.lua: the worker executable as processes: the titles `ps`
-- shows for the supervisor and its workers (the command line and the kernel's
-- short name), read from /proc; and the JIT's machine code, which each job's
-- traces leave mapped unless the worker's interposition of mmap64 and
-- munmap tracks it: the supervisor tests that at start and, when it cannot,
-- workers run with the JIT off.
local handler = require("handler")
local H = require("spec.support.helpers")

local format, concat, tostring, tonumber, ipairs = string.format, table.concat, tostring,
  tonumber, ipairs

-- The worker executable of the build under test: beside the core module.
local function worker_path()
  local core = assert(package.searchpath("handler.core", package.cpath))
  return (core:gsub("/[^/]*$", "")) .. "/handler-worker"
end

-- A process's command line as `ps` shows it: the arguments joined by
-- spaces, trailing NULs (the padding of a shortened title) dropped.
local function cmdline(pid)
  local s = H.read_file("/proc/" .. tostring(pid) .. "/cmdline")
  if s == nil then return nil end
  return (s:gsub("%z+$", ""):gsub("%z", " "))
end

-- A process's short name (comm), without the newline.
local function comm(pid)
  local s = H.read_file("/proc/" .. tostring(pid) .. "/comm")
  return s and (s:gsub("\n$", ""))
end

-- What `ps -o args` prints for pid.
local function ps_args(pid)
  -- Without the sanitizer the specs may run under: ps is not built for it.
  local p = io.popen("env -u LD_PRELOAD ps -o args= -p " .. tostring(pid))
  local s = p:read("*a")
  p:close()
  return (s:gsub("%s+$", ""))
end

-- A job returning the pid of its worker, without tainting it (no FFI).
local function job_pid()
  local f = io.open("/proc/self/stat")
  local s = f:read("*a")
  f:close()
  return tonumber(s:match("^(%d+)"))
end

-- The bytes of a process's anonymous executable mappings: the JIT's machine
-- code. (Counting lines would not do: adjacent areas merge into one, and the
-- sanitizers' allocator splits and joins its own.)
local function mcode_bytes(pid)
  local s = H.read_file("/proc/" .. tostring(pid) .. "/maps")
  if s == nil then return nil end
  local bytes = 0
  for a, b, perm, inode, rest in s:gmatch("(%x+)%-(%x+) (%S+) %S+ %S+ (%d+)([^\n]*)\n") do
    if perm:find("x", 1, true) and inode == "0" and not rest:find("[", 1, true) then
      bytes = bytes + (tonumber(b, 16) - tonumber(a, 16))
    end
  end
  return bytes
end

-- The supervisor speaks its control protocol (wire.h) with a luajit script
-- that plays the host: it starts the worker executable itself, asks for
-- workers with given pool names, and prints what /proc shows for each.
local DIRECT = [==[
local ffi = require("ffi")
ffi.cdef[[
typedef struct { void *base; size_t len; } sp_iovec;
typedef struct {
  void *name; unsigned namelen; sp_iovec *iov; size_t iovlen;
  void *control; size_t controllen; int flags;
} sp_msghdr;
typedef struct { size_t len; int level; int type; int fd; } sp_cmsg_fd;
typedef struct { size_t len; int level; int type; int fd[4]; } sp_cmsg_fd4;
int socketpair(int domain, int type, int proto, int sv[2]);
int pipe(int fds[2]);
int close(int fd);
long sendmsg(int fd, const sp_msghdr *m, int flags);
long recvmsg(int fd, sp_msghdr *m, int flags);
long recv(int fd, void *buf, size_t n, int flags);
long read(int fd, void *buf, size_t n);
int posix_spawn_file_actions_init(void *fa);
int posix_spawn_file_actions_adddup2(void *fa, int fd, int newfd);
int posix_spawn(int *pid, const char *path, const void *fa, const void *attr,
                char *const argv[], char *const envp[]);
int setenv(const char *k, const char *v, int overwrite);
int getpid(void);
int waitpid(int pid, int *status, int options);
long readlink(const char *path, char *buf, size_t n);
char **environ;
]]
local C = ffi.C
local AF_UNIX, SOCK_SEQPACKET, SOCK_CLOEXEC = 1, 5, 0x80000
local SOL_SOCKET, SCM_RIGHTS = 1, 1
local CTL_SPAWN, CTL_HELLO, CTL_SPAWNED, CTL_EXITED = 1, 1, 2, 3
local HELLO_LEN = 17 -- a frame header, then u32 pid
local function u32(n)
  return string.char(n % 256, math.floor(n / 256) % 256, math.floor(n / 65536) % 256,
    math.floor(n / 16777216) % 256)
end
local function get_u32(s, i)
  local a, b, c, d = s:byte(i, i + 3)
  return a + b * 256 + c * 65536 + d * 16777216
end
local function slurp(path)
  local f = io.open(path, "rb")
  if f == nil then return "?" end
  local s = f:read("*a")
  f:close()
  return s
end
local function show(what, pid)
  -- %q keeps NULs and control bytes visible.
  print(what, string.format("%q", slurp("/proc/" .. pid .. "/cmdline")),
    (slurp("/proc/" .. pid .. "/comm"):gsub("\n$", "")))
end
local buf = ffi.new("char[128]")
local function recv(fd)
  local n = tonumber(C.recv(fd, buf, 128, 0))
  assert(n > 0, "recv failed")
  return ffi.string(buf, n)
end
-- One message and the descriptor attached to it (-1: none).
local function recv_fd(fd)
  local iov = ffi.new("sp_iovec[1]")
  iov[0].base = buf
  iov[0].len = 128
  local cm = ffi.new("sp_cmsg_fd[1]")
  local mh = ffi.new("sp_msghdr[1]")
  mh[0].iov = iov
  mh[0].iovlen = 1
  mh[0].control = cm
  mh[0].controllen = ffi.sizeof("sp_cmsg_fd")
  local n = tonumber(C.recvmsg(fd, mh, 0))
  assert(n > 0, "recvmsg failed")
  local got = -1
  if mh[0].controllen > 0 and cm[0].level == SOL_SOCKET and cm[0].type == SCM_RIGHTS then
    got = cm[0].fd
  end
  return ffi.string(buf, n), got
end

C.setenv("TMPDIR", @TMPDIR@, 1)
local sv = ffi.new("int[2]")
assert(C.socketpair(AF_UNIX, SOCK_SEQPACKET + SOCK_CLOEXEC, 0, sv) == 0)
local fa = ffi.new("char[256]")
C.posix_spawn_file_actions_init(fa)
C.posix_spawn_file_actions_adddup2(fa, sv[1], 3)
-- A short argv: the titles are longer than its strings and run on over the
-- environment's, which the supervisor must have moved first.
local args = { @ARGV0@, "--supervisor", "", "", tostring(C.getpid()) }
local argv = ffi.new("char *[6]")
local keep = {}
for i, a in ipairs(args) do
  keep[i] = ffi.new("char[?]", #a + 1, a)
  argv[i - 1] = keep[i]
end
local pid = ffi.new("int[1]")
assert(C.posix_spawn(pid, @WORKER@, fa, nil, argv, C.environ) == 0)
C.close(sv[1])
local ctl = sv[0]
assert(recv(ctl):byte(1) == CTL_HELLO)
show("supervisor", pid[0])

local function spawn(id, name)
  -- The worker's reply pipe, stdout and stderr, whose read ends stay open
  -- here, and its job pipe, whose write end does.
  local w, out, err, job = ffi.new("int[2]"), ffi.new("int[2]"), ffi.new("int[2]"),
    ffi.new("int[2]")
  assert(C.pipe(w) == 0 and C.pipe(out) == 0 and C.pipe(err) == 0 and C.pipe(job) == 0)
  local msg = string.char(CTL_SPAWN) .. u32(id) .. "\0" .. name
  local iov = ffi.new("sp_iovec[1]")
  iov[0].base = ffi.cast("void *", msg)
  iov[0].len = #msg
  -- SPAWN carries the worker's reply pipe, stdout, stderr and job pipe, in
  -- that order.
  local cm = ffi.new("sp_cmsg_fd4[1]")
  cm[0].len = 32 -- CMSG_LEN(4 * sizeof(int))
  cm[0].level = SOL_SOCKET
  cm[0].type = SCM_RIGHTS
  cm[0].fd[0] = w[1]
  cm[0].fd[1] = out[1]
  cm[0].fd[2] = err[1]
  cm[0].fd[3] = job[0]
  local mh = ffi.new("sp_msghdr[1]")
  mh[0].iov = iov
  mh[0].iovlen = 1
  mh[0].control = cm
  mh[0].controllen = ffi.sizeof("sp_cmsg_fd4")
  assert(C.sendmsg(ctl, mh, 0) == #msg)
  C.close(w[1])
  C.close(out[1])
  C.close(err[1])
  C.close(job[0])
  -- SPAWNED (the pidfd attached is dropped by a plain recv), then the
  -- worker's own hello, with its pid, once it is running.
  local m, pidfd = recv_fd(ctl)
  -- Earlier workers' EXITED reports may come first.
  while m:byte(1) == CTL_EXITED do m, pidfd = recv_fd(ctl) end
  assert(m:byte(1) == CTL_SPAWNED and get_u32(m, 2) == id, "no SPAWNED")
  local hn = tonumber(C.read(w[0], buf, 128))
  assert(hn == HELLO_LEN, "no hello")
  local h = ffi.string(buf, hn)
  local wpid = get_u32(h, HELLO_LEN - 3)
  -- SPAWNED carries the worker's pid, and a pidfd of it attached.
  assert(#m == 9 and get_u32(m, 6) == wpid, "SPAWNED without the worker's pid")
  assert(pidfd >= 0, "SPAWNED without a pidfd")
  C.close(pidfd)
  return wpid, w[0], job[1]
end

for i, name in ipairs({ @NAMES@ }) do
  local wpid, fd, jobfd = spawn(i, name)
  show("worker", wpid)
  local cwd = ffi.new("char[512]")
  local n = tonumber(C.readlink("/proc/" .. wpid .. "/cwd", cwd, 512))
  print("cwd", n > 0 and ffi.string(cwd, n) or "?")
  -- The end of its job pipe: the worker exits.
  C.close(jobfd)
  C.close(fd)
end
C.close(ctl)
C.waitpid(pid[0], nil, 0)
print("done")
]==]

-- Runs DIRECT with the given argv[0] and pool names; returns its output and
-- its lines split on tabs.
local function direct(argv0, names, tmpdir)
  local quoted = {}
  for i, n in ipairs(names) do quoted[i] = format("%q", n) end
  local script = DIRECT:gsub("@(%u+%d?)@", {
    TMPDIR = format("%q", tmpdir),
    ARGV0 = format("%q", argv0),
    WORKER = format("%q", worker_path()),
    NAMES = concat(quoted, ", "),
  })
  local out = H.run_host(script)
  local rows = {}
  for line in out:gmatch("[^\n]+") do
    local row = {}
    for field in (line .. "\t"):gmatch("([^\t]*)\t") do row[#row + 1] = field end
    rows[#rows + 1] = row
  end
  return out, rows
end

-- The value DIRECT printed with %q, back as a string.
local function unq(s)
  return assert(loadstring("return " .. s))()
end

describe("process titles", function()
  H.leak_checked()

  it("show the supervisor as handler: supervisor, not its argv", function()
    local _, sup = H.workers()
    assert.is_number(sup)
    assert.are.equal("handler: supervisor", cmdline(sup))
    assert.are.equal("handler: supervisor", ps_args(sup))
    assert.are.equal("handler-sup", comm(sup))
    -- The host's environment is wiped from the supervisor's memory, which
    -- workers are copies of: /proc shows none of it (SECURITY.md).
    local env = H.read_file("/proc/" .. sup .. "/environ")
    assert.is_nil(env:find("PATH=", 1, true))
    assert.is_nil(env:find("=", 1, true))
  end)

  it("show a worker of an unnamed pool as handler: worker", function()
    local ok, pid = handler.run(job_pid)
    assert.is_true(ok)
    assert.is_true(H.contains(H.workers(), pid))
    assert.are.equal("handler: worker", cmdline(pid))
    assert.are.equal("handler: worker", ps_args(pid))
    assert.are.equal("handler-worker", comm(pid))
  end)

  it("show a worker of a named pool with the pool's name", function()
    local pool = handler.pool({ name = "process_spec_titled" })
    local ok, pid = pool:run(job_pid)
    assert.is_true(ok)
    -- The host sends the pool's name with the spawn request.
    local title = cmdline(pid)
    assert.are.equal("handler: worker (process_spec_titled)", title)
    assert.are.equal(title, ps_args(pid))
    assert.are.equal("handler-worker", comm(pid))
    pool:close()
  end)

  it("are read by the job itself from /proc/self", function()
    local ok, me, parent, mycomm = handler.run(function()
      local function slurp(p)
        local f = io.open(p)
        local s = f:read("*a")
        f:close()
        return s
      end
      local ppid = slurp("/proc/self/stat"):match("^.*%) %S (%d+)")
      return slurp("/proc/self/cmdline"), slurp("/proc/" .. ppid .. "/cmdline"),
        slurp("/proc/self/comm")
    end)
    assert.is_true(ok)
    assert.are.equal("handler: worker", (me:gsub("%z+$", "")))
    assert.are.equal("handler: supervisor", (parent:gsub("%z+$", "")))
    assert.are.equal("handler-worker\n", mycomm)
  end)

  describe("given by the supervisor from the spawn request's name", function()
    local tmp

    before_each(function()
      tmp = H.tmpdir()
    end)

    after_each(function()
      H.rm_r(tmp)
    end)

    it("over a short argv: a longer title runs on over the environment's strings", function()
      local long = string.rep("n", 39) .. "\195\169" -- 41 bytes, cut to 40 on the wire
      local out, rows = direct("w", { "mypool", "", "a\nb\tc\127d", long, string.rep("x", 60) },
        tmp)
      assert.are.equal("done", rows[#rows] and rows[#rows][1], out)
      local want = {
        { "supervisor", "handler: supervisor", "handler-sup" },
        { "worker", "handler: worker (mypool)", "handler-worker" },
        { "cwd" },
        { "worker", "handler: worker", "handler-worker" },
        { "cwd" },
        -- Control bytes shown as '?'.
        { "worker", "handler: worker (a?b?c?d)", "handler-worker" },
        { "cwd" },
        -- A UTF-8 sequence the wire cut in half is dropped.
        { "worker", "handler: worker (" .. string.rep("n", 39) .. ")", "handler-worker" },
        { "cwd" },
        { "worker", "handler: worker (" .. string.rep("x", 40) .. ")", "handler-worker" },
        { "cwd" },
      }
      for i, w in ipairs(want) do
        local row = rows[i]
        assert(row ~= nil and row[1] == w[1], "line " .. i .. " of:\n" .. out)
        if w[1] == "cwd" then
          -- TMPDIR, read by the supervisor after it took argv for its title.
          assert.are.equal(tmp .. "/handler-", row[2]:sub(1, #tmp + 9))
        else
          -- Exactly the title, padded with NULs to the end of the area.
          local raw = unq(row[2])
          assert.are.equal(w[2], (raw:gsub("%z+$", "")), out)
          assert.is_nil(raw:gsub("%z+$", ""):find("%z"), out)
          assert.are.equal(w[3], row[3])
        end
      end
    end)

    it("over a long argv", function()
      local out, rows = direct(string.rep("/long", 100) .. "/handler-worker", { "p" }, tmp)
      assert.are.equal("done", rows[#rows] and rows[#rows][1], out)
      assert.are.equal("handler: supervisor", (unq(rows[1][2]):gsub("%z+$", "")))
      assert.are.equal("handler: worker (p)", (unq(rows[2][2]):gsub("%z+$", "")))
    end)
  end)
end)

-- A host whose supervisor starts with the interposition's self-test forced
-- to fail. It runs in one worker: jobs whose hot loops would compile traces,
-- and the worker's machine code before and after them.
local NO_INTERPOSE = [==[
local ffi = require("ffi")
ffi.cdef("int setenv(const char *, const char *, int);")
ffi.C.setenv("HANDLER_TEST_NO_INTERPOSE", "1", 1)
local handler = require("handler")
local pool = handler.pool({ max_workers = 1 })
local function job_pid()
  local f = io.open("/proc/self/stat")
  local s = f:read("*a")
  f:close()
  return tonumber(s:match("^(%d+)"))
end
local function mcode_bytes(pid)
  local f = io.open("/proc/" .. pid .. "/maps")
  local bytes = 0
  for a, b, perm, inode, rest in f:read("*a"):gmatch("(%x+)%-(%x+) (%S+) %S+ %S+ (%d+)([^\n]*)\n") do
    if perm:find("x", 1, true) and inode == "0" and not rest:find("[", 1, true) then
      bytes = bytes + (tonumber(b, 16) - tonumber(a, 16))
    end
  end
  f:close()
  return bytes
end
print("status", pool:run(function() return (jit.status()) end))
local _, pid = pool:run(job_pid)
for i = 1, 20 do pool:run(function() local s = 0 for k = 1, 1000 do s = s + k end return s end) end
local before, wrong = mcode_bytes(pid), 0
for i = 1, 200 do
  local ok, v = pool:run(function()
    local s = 0
    for k = 1, 1000 do s = s + k end
    return s + i
  end)
  if not ok or v ~= 500500 + i then wrong = wrong + 1 end
end
local _, after_pid = pool:run(job_pid)
print("jobs", wrong, after_pid == pid)
print("mcode", before, mcode_bytes(pid))
-- A job may turn the JIT on; its worker then serves no other job.
print("on", pool:run(function() jit.on() return (jit.status()), job_pid() end))
print("next", pool:run(function() return (jit.status()), job_pid() end))
]==]

describe("the JIT's machine code", function()
  H.leak_checked()

  it("is compiled in jobs: the supervisor's self-test passed", function()
    local ok, on, traced = handler.run(function()
      local s = 0
      for i = 1, 1000 do s = s + i end
      return jit.status(), require("jit.util").traceinfo(1) ~= nil
    end)
    assert.is_true(ok)
    assert.is_true(on)
    assert.is_true(traced)
  end)

  it("is unmapped after each job: 200 jobs with traces leave the mappings as they were", function()
    local pool = handler.pool({ max_workers = 1 })
    local function hot(i)
      return function()
        local s = 0
        for k = 1, 1000 do s = s + k end
        return s + i, require("jit.util").traceinfo(1) ~= nil
      end
    end
    local _, pid = pool:run(job_pid)
    for i = 1, 20 do assert.is_true((pool:run(hot(i)))) end
    local before = mcode_bytes(pid)
    for i = 1, 200 do
      local ok, v, traced = pool:run(hot(i))
      assert.is_true(ok)
      assert.are.equal(500500 + i, v)
      assert.is_true(traced)
    end
    local _, after_pid = pool:run(job_pid)
    assert.are.equal(pid, after_pid)
    local after = mcode_bytes(pid)
    assert(after <= before, format("machine code grew from %d to %d bytes", before, after))
    pool:close()
  end)

  it("is off in jobs when the self-test fails, and jobs still work", function()
    local out = H.run_host(NO_INTERPOSE)
    assert.matches("handler-worker: the JIT's machine code cannot be tracked", out, 1, true)
    assert.matches("\nstatus\ttrue\tfalse\n", out)
    assert.matches("\njobs\t0\ttrue\n", out)
    local before, after = out:match("\nmcode\t(%d+)\t(%d+)\n")
    assert(before ~= nil, out)
    assert(tonumber(after) <= tonumber(before), "machine code grew:\n" .. out)
    -- jit.on works for the job that calls it, which taints its worker: the
    -- next job runs in a fresh one, with the JIT off again.
    local on, pid1 = out:match("\non\ttrue\t(%S+)\t(%d+)\n")
    local next_on, pid2 = out:match("\nnext\ttrue\t(%S+)\t(%d+)\n")
    assert.are.equal("true", on, out)
    assert.are.equal("false", next_on, out)
    assert.are_not.equal(pid1, pid2)
  end)
end)

-- Like H.run_host, with the shell redirections given: `redir` is formatted
-- with the output file's path. Returns what the host wrote there.
local function run_host_redir(script, redir)
  local dir = H.tmpdir()
  local path, out = dir .. "/host.lua", dir .. "/out"
  H.write_file(path, script)
  os.execute(H.lua_env() .. " timeout -s KILL 60 luajit " .. H.shell_quote(path) .. " "
    .. format(redir, H.shell_quote(out)))
  local text = H.read_file(out) or ""
  H.rm_r(dir)
  return text
end

describe("the worker executable", function()
  local snap, tmp

  setup(function()
    H.warm()
  end)

  before_each(function()
    snap = H.snapshot()
    tmp = H.tmpdir()
  end)

  after_each(function()
    H.rm_r(tmp)
    H.assert_clean(snap)
  end)

  it("charges print with what __tostring and tostring return", function()
    local out = H.run_host([[
      local handler = require("handler")
      local function report(what, ok, err)
        -- The worker writes to the same file, unbuffered by us: flushed on
        -- both sides of the line, the line stays between the jobs' output.
        io.stdout:flush()
        print("\n" .. what, ok, type(err) == "table" and err.reason or tostring(err))
        io.stdout:flush()
      end
      local long = setmetatable({}, { __tostring = function() return ("x"):rep(100000) end })
      for _, sandbox in ipairs({ false, true }) do
        local tag = sandbox and "sandboxed" or "trusted"
        report(tag .. "_mt", handler.run(function()
          print(setmetatable({}, { __tostring = function() return ("x"):rep(100000) end }))
          return 1
        end, { max_output_bytes = 1000, sandbox = sandbox }))
        report(tag .. "_tostring", handler.run(function()
          tostring = function() return ("y"):rep(100000) end
          print(1, "a", nil)
          return 1
        end, { max_output_bytes = 1000, sandbox = sandbox }))
        report(tag .. "_fits", handler.run(function()
          print("ab", 12, nil, true)
          print()
          return 1
        end, { max_output_bytes = 16, sandbox = sandbox }))
        report(tag .. "_over", handler.run(function()
          print("ab", 12, nil, true)
          print()
          return 1
        end, { max_output_bytes = 15, sandbox = sandbox }))
        report(tag .. "_notstring", handler.run(function()
          tostring = function() return {} end
          print(1)
        end, { sandbox = sandbox }))
      end
    ]])
    -- The host meters the worker's stdout: of each job's 100000 bytes, at
    -- most max_output_bytes reach the host's.
    for _, c in ipairs({ "x", "y" }) do
      for run in out:gmatch(c .. "+") do
        assert(#run <= 1000, format("a job passed on %d bytes:\n%s", #run, out:sub(1, 2000)))
      end
    end
    for _, tag in ipairs({ "trusted", "sandboxed" }) do
      for _, case in ipairs({ "_mt", "_tostring", "_over" }) do
        assert.matches("\n" .. tag .. case .. "\tfalse\toutput limit\n", out, 1, true)
      end
      -- "ab\t12\tnil\ttrue\n" and "\n": 16 bytes, written as print writes.
      assert.matches("ab\t12\tnil\ttrue\n\n\n" .. tag .. "_fits\ttrue\t1", out, 1, true)
      assert.matches("\n" .. tag .. "_notstring\tfalse\t[^\n]*'tostring' must return a string"
        .. " to 'print'", out)
    end
  end)

  it("makes relative module paths absolute against a host directory of any length", function()
    -- Deeper than 1024 bytes, short of PATH_MAX.
    local deep = tmp
    for _ = 1, 6 do deep = deep .. "/" .. ("d"):rep(200) end
    os.execute("mkdir -p " .. H.shell_quote(deep .. "/sub"))
    H.write_file(deep .. "/sub/deepmod.lua", "return 'deep'")
    local out = H.run_host(format([[
      local ffi = require("ffi")
      ffi.cdef("int chdir(const char *);")
      assert(ffi.C.chdir(%q) == 0)
      local handler = require("handler")
      assert(handler.run(function() return 1 end))
      -- Changed after the supervisor started: jobs carry the paths.
      package.path = "sub/?.lua;" .. package.path
      print("required", handler.run(function() return require("deepmod") end))
    ]], deep))
    assert.matches("required\ttrue\tdeep\n", out, 1, true)
  end)

  it("gives workers /dev/null for a host's closed standard input, pipes for its output", function()
    local out = run_host_redir([[
      local handler = require("handler")
      local ok, a, b = handler.run(function()
        local ffi = require("ffi")
        ffi.cdef("long readlink(const char *, char *, size_t);")
        local function link(fd)
          local buf = ffi.new("char[256]")
          local n = tonumber(ffi.C.readlink("/proc/self/fd/" .. fd, buf, 256))
          return n > 0 and ffi.string(buf, n) or "closed"
        end
        return link(0), link(1)
      end)
      io.stderr:write("fds\t", tostring(ok), "\t", tostring(a), "\t", tostring(b), "\n")
    ]], "<&- >&- 2> %s")
    -- Descriptor 1 is the pipe the host meters, even with its own closed
    -- (what comes through it is then dropped).
    assert.matches("fds\ttrue\t/dev/null\tpipe:%[%d+%]\n", out)
  end)

  it("fails a spawn at once when the supervisor has no room for the worker's socket", function()
    local out = H.run_host([[
      local ffi = require("ffi")
      ffi.cdef([=[
        typedef struct { unsigned long cur, max; } ps_rlimit;
        int prlimit(int pid, int resource, const ps_rlimit *new, ps_rlimit *old);
      ]=])
      local RLIMIT_NOFILE = 7
      local handler = require("handler")
      assert(handler.run(function() return 1 end))
      local sup = handler._core.procs().supervisor
      local n = 0
      local ls = io.popen("ls /proc/" .. sup .. "/fd")
      for _ in ls:lines() do n = n + 1 end
      ls:close()
      -- Room for the descriptors it holds, not one more (the soft limit:
      -- raising a hard one back takes a capability).
      local old = ffi.new("ps_rlimit")
      assert(ffi.C.prlimit(sup, RLIMIT_NOFILE, nil, old) == 0)
      assert(ffi.C.prlimit(sup, RLIMIT_NOFILE, ffi.new("ps_rlimit", n, old.max), nil) == 0)
      local pool = handler.pool({})
      local clock0 = os.time()
      local ok, err = pool:run(function() return 2 end, { max_ms = 20000 })
      print("limited", ok, type(err) == "table" and err.type, os.time() - clock0 < 10)
      assert(ffi.C.prlimit(sup, RLIMIT_NOFILE, old, nil) == 0)
      print("after", pool:run(function() return 3 end))
    ]])
    assert.matches("limited\tfalse\tProcessExit\ttrue\n", out, 1, true)
    assert.matches("after\ttrue\t3\n", out, 1, true)
  end)

  it("runs no job when it cannot make the job's private directory", function()
    local out = H.run_host(format([[
      local ffi = require("ffi")
      ffi.cdef("int chdir(const char *); int setenv(const char *, const char *, int);")
      assert(ffi.C.chdir(%q) == 0)
      ffi.C.setenv("TMPDIR", %q, 1)
      local handler = require("handler")
      for i = 1, 2 do
        local ok, err = handler.run(function()
          io.open("written-here", "w"):close()
          return 1
        end, { max_ms = 10000 })
        print("run", ok, type(err) == "table" and err.type)
      end
    ]], tmp, tmp .. "/missing"))
    assert.matches("run\tfalse\tProcessExit\nrun\tfalse\tProcessExit\n", out, 1, true)
    assert.is_false(H.exists(tmp .. "/written-here"))
    -- Said once, on stderr.
    local _, said = out:gsub("cannot make a worker's directory in " .. tmp:gsub("%p", "%%%0")
      .. "/missing: No such file or directory", "")
    assert.are.equal(1, said, out)
  end)
end)
