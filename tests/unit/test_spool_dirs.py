"""Private spool directories left by workers that are gone: which names, which to remove."""

from fileproxy.delivery.spool import PRIVATE_DIR_PREFIX, private_dir_pid, stale_private_dirs


def test_only_a_private_spool_directory_name_has_a_pid():
    assert PRIVATE_DIR_PREFIX == "fileproxy-spool-"
    assert private_dir_pid("fileproxy-spool-4242-abc_123") == 4242
    for name in [
        "fileproxy-spool-4242-",  # no random part
        "fileproxy-spool-4242",
        "fileproxy-spool--abc",
        "fileproxy-spool-0-abc",  # no such worker
        "fileproxy-spool-42x-abc",
        "fileproxy-spool-٤٢-abc",  # digits, but not ASCII ones
        "fileproxy-spool-42-a-b",  # not what mkdtemp makes
        "xfileproxy-spool-42-abc",
        "fileproxy-cache-42-abc",
        "tmpabc",
    ]:
        assert private_dir_pid(name) is None, name


def test_stale_are_the_private_directories_of_pids_not_alive():
    asked: list[int] = []

    def alive(pid: int) -> bool:
        asked.append(pid)
        return pid in (10, 30)

    names = [
        "fileproxy-spool-20-b",
        "fileproxy-spool-10-a",
        "fileproxy-spool-20-a",  # the same dead worker twice (a pid reused, then dead again)
        "fileproxy-spool-30-c",
        "fileproxy-spool-40-d",
        "systemd-private-40-x",  # not ours, whatever its pid
    ]
    assert stale_private_dirs(names, alive) == [
        "fileproxy-spool-20-a",
        "fileproxy-spool-20-b",
        "fileproxy-spool-40-d",
    ]
    assert sorted(asked) == [10, 20, 30, 40]  # once per pid
    assert stale_private_dirs([], alive) == []
