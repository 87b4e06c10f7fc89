"""tierd.kernel.procs: pure parsers on strings, readers on the proc-basic fixture tree and on a fake tree."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tests.proc_fixture import (
    CGROUP_HYBRID,
    CGROUP_V2,
    FIXTURES,
    MLOCK_ADDR,
    MLOCK_PID,
    PROC,
)
from tierd.kernel.fs import ProcFS, ReadFailure
from tierd.kernel.mempolicy import MemPolicy, MemPolicyMode
from tierd.kernel.procs import (
    PF_KTHREAD,
    CgroupFS,
    CgroupMembership,
    ProcessDenied,
    ProcessExited,
    ProcFileMissing,
    ProcReadError,
    ProcUnparsable,
    list_pids,
    list_user_pids,
    open_pidfd,
    open_pidfd_checked,
    parse_cgroup,
    parse_maps,
    parse_numa_maps,
    parse_smaps,
    parse_stat,
    parse_status,
    read_cgroup,
    read_cpuset_mems,
    read_maps,
    read_numa_maps,
    read_proc_text,
    read_smaps,
    read_stat,
    read_stat_checked,
    read_status,
)


class FailingProcFS(ProcFS):
    """A fixture tree where chosen files fail as the kernel would make them (tests run as root: chmod can't deny)."""

    def __init__(self, root: Path, failures: dict[str, str]) -> None:
        super().__init__(root)
        self.failures = failures

    def read_text(self, rel: str) -> str:
        if rel in self.failures:
            raise ReadFailure(rel, self.failures[rel])
        return super().read_text(rel)


# ---- stat -----------------------------------------------------------------------------------------------------

STAT_CAT = (
    "17274 (cat) R 17266 17266 16934 0 -1 4194304 99 0 0 0 0 0 0 0 20 0 1 0 37769 3133440 388 "
    "18446744073709551615 94223458926592 94223458946473 140723990767008 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0 "
    "94223458962480 94223458964096 94223474380800 140723990768346 140723990768366 140723990768366 "
    "140723990769643 0"
)


def test_parse_stat_fields() -> None:
    s = parse_stat(STAT_CAT)
    assert (s.pid, s.comm, s.state, s.ppid, s.num_threads, s.starttime_ticks) == (17274, "cat", "R", 17266, 1, 37769)
    assert not s.is_kernel_thread and not s.is_dead


def test_parse_stat_cpu_ticks_are_utime_plus_stime() -> None:
    assert parse_stat(STAT_CAT).cpu_ticks == 0
    busy = STAT_CAT.replace(" 99 0 0 0 0 0 0 0 20 ", " 99 0 0 0 7 5 3 2 20 ")  # utime 7, stime 5, children 3, 2
    assert parse_stat(busy).cpu_ticks == 12


def test_parse_stat_minor_faults_are_field_10() -> None:
    assert parse_stat(STAT_CAT).minor_faults == 99
    assert parse_stat(STAT_CAT.replace(" 4194304 99 0 ", " 4194304 123456 7 ")).minor_faults == 123456  # not majflt


def test_parse_stat_comm_with_spaces_and_parens() -> None:
    s = parse_stat(STAT_CAT.replace("(cat)", "(a (b) c)"))
    assert s.comm == "a (b) c"
    assert s.starttime_ticks == 37769


def test_parse_stat_kernel_thread_flag() -> None:
    kthreadd = "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 26 0 0 18446744073709551615 0 0"
    s = parse_stat(kthreadd)
    assert s.flags & PF_KTHREAD
    assert s.is_kernel_thread
    assert s.starttime_ticks == 26


@pytest.mark.parametrize("text", ["", "17 cat R 1", "17 (cat) R 1 2 3"])
def test_parse_stat_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        parse_stat(text)


# ---- status ---------------------------------------------------------------------------------------------------


def test_parse_status_fixture() -> None:
    st = parse_status((FIXTURES / "proc/100/status").read_text())
    assert st.name == "app (worker) x"
    assert (st.uid_real, st.uid_effective) == (1000, 1000)
    assert st.kthread is False
    assert st.nspid == (100, 7)
    assert st.cpus_allowed == frozenset({0, 1, 2, 3})
    assert st.mems_allowed == frozenset({0, 1, 2})
    assert st.vm_rss_bytes == 8416 * 1024
    assert st.vm_swap_bytes == 1024 * 1024
    assert st.vm_lck_bytes == 64 * 1024


def test_parse_status_old_kernel_without_optional_lines() -> None:
    st = parse_status("Name:\tx\nMems_allowed_list:\t0\n")
    assert st.kthread is None and st.uid_real is None and st.vm_rss_bytes is None
    assert st.mems_allowed == frozenset({0}) and st.cpus_allowed == frozenset()


# ---- maps -----------------------------------------------------------------------------------------------------


def test_parse_maps_lines() -> None:
    text = (
        "55d0c0000000-55d0c0002000 r--p 00001000 fe:00 1234                       /usr/bin/app\n"
        "7f0000000000-7f0040000000 rw-p 00000000 00:00 0 \n"
        "7f0100020000-7f0100030000 r--p 00000000 fe:00 999                        /opt/my app/data.bin\n"
        "7f0100040000-7f0100050000 rw-s 00000000 00:01 77                         /memfd:buf (deleted)\n"
    )
    m = parse_maps(text)
    assert [(e.start, e.end) for e in m][:2] == [(0x55D0C0000000, 0x55D0C0002000), (0x7F0000000000, 0x7F0040000000)]
    assert (m[0].perms, m[0].offset, m[0].dev, m[0].inode, m[0].path) == ("r--p", 0x1000, "fe:00", 1234, "/usr/bin/app")
    assert m[1].path == ""
    assert m[2].path == "/opt/my app/data.bin"
    assert m[3].path == "/memfd:buf (deleted)"


def test_parse_maps_malformed() -> None:
    with pytest.raises(ValueError):
        parse_maps("zzzz-1 rw-p 0 00:00 0\n")


# ---- numa_maps ------------------------------------------------------------------------------------------------


def test_parse_numa_maps_counts_and_markers() -> None:
    text = (
        "55d0c1000000 default heap anon=200 dirty=200 active=0 N0=150 N1=50 kernelpagesize_kB=4\n"
        "7f21e395000 default file=/usr/lib/locale/C.utf8/LC_CTYPE mapped=32 mapmax=7 N0=32 kernelpagesize_kB=4\n"
        "7f00c0000000 bind:1 file=/dev/hugepages/buf huge dirty=3 N1=3 kernelpagesize_kB=2048\n"
        "7ffd00000000 default stack anon=5 dirty=5 swapcache=2 writeback=1 N0=5 kernelpagesize_kB=4\n"
        "7ffd00100000 default\n"
    )
    heap, locale, huge, stack, vdso = parse_numa_maps(text)
    assert heap.heap and not heap.stack and heap.file is None
    assert heap.pages_by_node == ((0, 150), (1, 50))
    assert (heap.anon_pages, heap.dirty_pages, heap.active_pages, heap.page_size_bytes) == (200, 200, 0, 4096)
    assert locale.file == "/usr/lib/locale/C.utf8/LC_CTYPE" and locale.mapmax == 7 and locale.mapped_pages == 32
    assert huge.huge and huge.mempolicy.mode is MemPolicyMode.BIND and huge.page_size_bytes == 2 * 1024 * 1024
    assert huge.pages_by_node == ((1, 3),)
    assert stack.stack and stack.swapcache_pages == 2 and stack.writeback_pages == 1
    assert vdso.pages_by_node == () and vdso.page_size_bytes is None and vdso.active_pages is None


def test_parse_numa_maps_multiword_policies_and_escaped_path() -> None:
    text = (
        "7f0080400000 prefer (many):1-2 anon=5 dirty=5 N2=5 kernelpagesize_kB=4\n"
        "7f0080600000 weighted interleave:0-2 anon=9 dirty=9 N0=3 N1=3 N2=3 kernelpagesize_kB=4\n"
        "7f0100020000 default file=/opt/my\\040app/data\\075x.bin mapped=4 N0=4 kernelpagesize_kB=4\n"
    )
    many, weighted, spaced = parse_numa_maps(text)
    assert many.mempolicy == MemPolicy(MemPolicyMode.PREFERRED_MANY, frozenset({1, 2}))
    assert many.pages_by_node == ((2, 5),)
    assert weighted.mempolicy.mode is MemPolicyMode.WEIGHTED_INTERLEAVE
    assert weighted.pages_by_node == ((0, 3), (1, 3), (2, 3))
    assert spaced.file == "/opt/my app/data=x.bin"


def test_parse_numa_maps_ignores_unknown_keys() -> None:
    (e,) = parse_numa_maps("1000 default anon=1 future=7 N0=1 kernelpagesize_kB=4\n")
    assert e.pages_by_node == ((0, 1),)


def test_parse_numa_maps_bad_line_names_it() -> None:
    with pytest.raises(ValueError, match="numa_maps line"):
        parse_numa_maps("1000 scatter:0 anon=1\n")


def test_parse_numa_maps_this_host() -> None:
    entries = parse_numa_maps(Path("/proc/self/numa_maps").read_text())
    assert entries and all(isinstance(e.mempolicy.mode, MemPolicyMode) for e in entries)


# ---- smaps ----------------------------------------------------------------------------------------------------


def test_parse_smaps_real_mlocked_range() -> None:
    entries = {e.start: e for e in parse_smaps((FIXTURES / f"proc/{MLOCK_PID}/smaps").read_text())}
    locked = entries[MLOCK_ADDR]
    assert locked.mlocked and "lo" in locked.vm_flags
    assert locked.locked_bytes == 256 * 1024 and locked.rss_bytes == 256 * 1024
    assert sum(1 for e in entries.values() if e.mlocked) == 1


def test_parse_smaps_flags_and_sizes() -> None:
    text = (
        "7f0000000000-7f0040000000 rw-p 00000000 00:00 0 \n"
        "Size:            1048576 kB\nKernelPageSize:        4 kB\nRss:                4096 kB\n"
        "AnonHugePages:      2048 kB\nSwap:                 8 kB\nLocked:                0 kB\n"
        "THPeligible:    1\nVmFlags: rd wr mr mw me ac hg \n"
        "7f00c0000000-7f0100000000 rw-s 00000000 00:10 4567                       /dev/hugepages/buf\n"
        "Size:            1048576 kB\nKernelPageSize:     2048 kB\nLocked:                0 kB\n"
        "VmFlags: rd wr sh mr mw me ms de ht \n"
        "7f0100010000-7f0100020000 rw-p 00000000 00:00 0 \nLocked:               64 kB\nVmFlags: rd wr \n"
    )
    thp, huge, locked = parse_smaps(text)
    assert (thp.anon_huge_bytes, thp.rss_bytes, thp.swap_bytes) == (2 << 20, 4 << 20, 8192)
    assert not thp.mlocked and not thp.hugetlb
    assert huge.hugetlb and huge.kernel_page_size_bytes == 2 << 20
    assert locked.mlocked and "lo" not in locked.vm_flags  # Locked > 0 is enough


# ---- cgroup ---------------------------------------------------------------------------------------------------


def test_parse_cgroup_v2_only() -> None:
    assert parse_cgroup("0::/tierd.slice/app.service\n") == CgroupMembership("/tierd.slice/app.service", ())


def test_parse_cgroup_hybrid() -> None:
    m = parse_cgroup("bogus\n9:name=systemd:/\n3:cpuset:/batch\n1:cpu,cpuacct:/x:y\n0::/\n")  # a line before any entry is skipped
    assert m.unified == "/"
    assert m.v1_path("cpuset") == "/batch"
    assert m.v1_path("cpuacct") == "/x:y"
    assert m.v1_path("memory") is None


def test_cpuset_v2_walks_up_to_the_first_file() -> None:
    got = read_cpuset_mems(CGROUP_V2, CgroupMembership("/tierd.slice/app.service", ()))
    assert got is not None
    assert got.nodes == frozenset({0, 1})
    assert got.source == "tierd.slice/cpuset.mems.effective"


def test_cpuset_v2_unknown_cgroup_falls_back_to_root() -> None:
    got = read_cpuset_mems(CGROUP_V2, CgroupMembership("/gone.scope", ()))
    assert got is not None and got.nodes == frozenset({0, 1, 2}) and got.source == "cpuset.mems.effective"


def test_cpuset_v1_in_hybrid_tree() -> None:
    m = parse_cgroup((FIXTURES / "proc/500/cgroup").read_text())
    got = read_cpuset_mems(CGROUP_HYBRID, m)
    assert got is not None
    assert got.nodes == frozenset({1}) and got.source == "cpuset/batch/cpuset.effective_mems"


def test_cpuset_unanswered_is_none() -> None:
    # hybrid tree, v2-only membership: the unified hierarchy has no cpuset controller
    assert read_cpuset_mems(CGROUP_HYBRID, CgroupMembership("/batch.slice", ())) is None
    assert read_cpuset_mems(CgroupFS(FIXTURES / "nonexistent"), CgroupMembership("/", ())) is None


def test_cpuset_this_host() -> None:
    m = read_cgroup(ProcFS("/proc"), os.getpid())
    got = read_cpuset_mems(CgroupFS("/sys/fs/cgroup"), m)
    assert got is None or 0 in got.nodes


# ---- readers on the fixture tree ------------------------------------------------------------------------------


def test_list_pids_and_user_pids() -> None:
    assert list_pids(PROC) == [2, 3, 100, 300, 500, 600, MLOCK_PID]
    user, left_out = list_user_pids(PROC)
    assert user == [100, 500, 600, MLOCK_PID]
    assert left_out == 3  # two kernel threads and the vanished 300


def test_readers_on_fixture() -> None:
    assert read_stat(PROC, 100).starttime_ticks == 12345
    assert read_status(PROC, 100).mems_allowed == frozenset({0, 1, 2})
    assert len(read_maps(PROC, 100)) == 17
    assert len(read_numa_maps(PROC, 100)) == 17  # one without a maps entry, [vsyscall] missing
    assert any(e.mlocked for e in read_smaps(PROC, 100))
    assert read_cgroup(PROC, 100).unified == "/tierd.slice/app.service"


def test_vanished_process_is_exited() -> None:
    with pytest.raises(ProcessExited) as ei:
        read_stat(PROC, 300)
    assert ei.value.reason == "exited" and ei.value.pid == 300
    with pytest.raises(ProcessExited):
        read_maps(PROC, 300)
    with pytest.raises(ProcessExited):
        read_status(PROC, 4242)  # no directory at all


def test_missing_file_of_a_live_process() -> None:
    with pytest.raises(ProcFileMissing) as ei:
        read_smaps(PROC, 500)
    assert ei.value.reason == "missing"


def test_permission_denied_and_esrch_are_typed() -> None:
    fake = FailingProcFS(
        FIXTURES / "proc",
        {"100/numa_maps": "permission denied", "100/smaps": os.strerror(errno.ESRCH), "100/maps": "Input/output error"},
    )
    with pytest.raises(ProcessDenied) as denied:
        read_numa_maps(fake, 100)
    assert denied.value.reason == "permission denied"
    with pytest.raises(ProcessExited):
        read_smaps(fake, 100)
    with pytest.raises(ProcReadError) as other:
        read_maps(fake, 100)
    assert other.value.reason == "unreadable" and "Input/output" in str(other.value)
    assert isinstance(denied.value, ReadFailure)  # callers that already catch ReadFailure keep working


def test_unparsable_file(tmp_path: Path) -> None:
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "stat").write_text("garbage")
    with pytest.raises(ProcUnparsable) as ei:
        read_stat(ProcFS(tmp_path), 7)
    assert ei.value.reason == "unparsable" and "7/stat" in str(ei.value)


def test_read_proc_text_live() -> None:
    assert read_proc_text(ProcFS("/proc"), os.getpid(), "comm")


# ---- pidfd ----------------------------------------------------------------------------------------------------


def test_open_pidfd_self_and_checked() -> None:
    procfs = ProcFS("/proc")
    me = read_stat(procfs, os.getpid())
    fd = open_pidfd(os.getpid())
    os.close(fd)
    fd = open_pidfd_checked(procfs, os.getpid(), me.starttime_ticks)
    os.close(fd)
    with pytest.raises(ProcessExited, match="pid reused"):
        open_pidfd_checked(procfs, os.getpid(), me.starttime_ticks + 1)


def test_read_stat_checked_refuses_a_reused_pid() -> None:
    procfs = ProcFS("/proc")
    me = read_stat(procfs, os.getpid())
    assert read_stat_checked(procfs, os.getpid(), me.starttime_ticks).pid == os.getpid()
    with pytest.raises(ProcessExited, match="pid reused"):
        read_stat_checked(procfs, os.getpid(), me.starttime_ticks + 1)


def test_open_pidfd_gone() -> None:
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    candidate = next(p for p in range(pid_max - 1, 1, -1) if not Path(f"/proc/{p}").exists())
    with pytest.raises(ProcessExited):
        open_pidfd(candidate)


def test_process_names_with_spaces_parentheses_and_newlines() -> None:
    from tierd.kernel.procs import parse_stat

    fields = " ".join(["S", "1"] + ["0"] * 4 + ["4194304"] + ["0"] * 10 + ["3", "0", "12345"] + ["0"] * 30)
    for comm in ("a b", "x) (y", ") 1 2 (", "new\nline", "((("):
        st = parse_stat(f"4242 ({comm}) {fields}")
        assert (st.pid, st.comm, st.state, st.ppid, st.num_threads, st.starttime_ticks) == (4242, comm, "S", 1, 3,
                                                                                             12345)


def test_cgroup_paths_with_spaces_parentheses_colons_and_newlines() -> None:
    from tierd.kernel.procs import parse_cgroup

    assert parse_cgroup("0::/system.slice/my app (v2):blue.service\n").unified == \
        "/system.slice/my app (v2):blue.service"
    assert parse_cgroup("0::/evil\nname/child\n").unified == "/evil\nname/child"
    hybrid = parse_cgroup("12:cpuset:/a b\n(c)\n0::/u\n")
    assert hybrid.unified == "/u" and hybrid.v1 == ((frozenset({"cpuset"}), "/a b\n(c)"),)
