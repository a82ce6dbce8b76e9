"""Subcommands for this machine's devices and the activation cache: devices, cache."""

from __future__ import annotations

from saesweep.cli.common import EXIT_OK, flag, parse_overrides, spec_flags, spec_from_args
from saesweep.config.experiment import load_config
from saesweep.errors import ConfigError


def devices_args(p):
    pass


def cmd_devices(args) -> int:
    from saesweep.devices import detect, parse_devices

    found = detect()
    for d in found:
        print(d.line())
    print(f"\n--devices auto uses: {[s.name for s in parse_devices('auto', found)]}")
    return EXIT_OK


def cache_args(p):
    p.add_argument("action", choices=["ls", "rm", "verify", "warm"],
                   help="ls | rm KEYS | verify [KEYS] | warm: build the entries a sweep (--spec) or a config (--config) needs")
    p.add_argument("keys", nargs="*", help="entries to remove or verify (default for verify: all)")
    flag(p, "all", action="store_true", help="with rm: remove every entry")
    flag(p, "cache_dir", help="cache folder (default: the configs' cache_dir, else $SAESWEEP_CACHE or ~/.cache/saesweep)")
    spec_flags(p)
    flag(p, "config", help="with warm: an experiment config YAML instead of a sweep spec")
    flag(p, "device", default="auto", help="with warm: device of the language model (default auto)")


def cmd_cache(args) -> int:
    from saesweep.data import cache, cache_build

    if args.action == "warm":  # build every entry the trials need, here and now (hosts with cache_mode: wait only read)
        from saesweep.training.trainer import resolve_device

        if args.config:
            configs = [load_config(args.config)]
            updates = parse_overrides(args.set)
            if updates:
                configs = [configs[0].with_updates(**updates)]
        else:
            from saesweep.config.sweep import expand

            spec = spec_from_args(args)
            configs = [spec.base_config(t) for t in spec.sae_types] if not spec.search.is_grid else expand(spec)
        if args.cache_dir:
            configs = [c.with_updates(cache_dir=str(args.cache_dir)) for c in configs]
        hf_configs = [c for c in configs if c.source.kind == "hf"]
        if not hf_configs:
            print("nothing to warm: these trials use synthetic activations, which are not cached")
            return EXIT_OK
        for e in cache_build.warm(hf_configs, device=resolve_device(args.device), progress=None):
            what = "built" if e["built"] else "already cached"
            print(f"{e['key']}  {what}: {e['model']}  {e['hook']}  {e['dataset']}  {e['tokens']:,} tokens  "
                  f"({e['seconds']}s)  -> {e['path']}")
        return EXIT_OK
    root = cache.cache_root(args.cache_dir)
    if args.action == "ls":
        entries = cache.list_entries(root)
        if not entries:
            print(f"no cached activations in {root}")
        for e in entries:
            print(f"{e['key']}  {e['model']}  {e['hook']}  {e['dataset']}  {e['tokens']:,} tokens  "
                  f"{e['size_bytes'] / 2**20:.1f} MiB")
        return EXIT_OK
    if args.action == "rm":
        if not args.keys and not args.all:
            raise ConfigError("cache rm: name the keys to remove, or --all")
        removed = cache.remove_entries(root, "all" if args.all else args.keys)
        print(f"removed {len(removed)} entries from {root}")
        return EXIT_OK
    bad = [e["key"] for e in cache.list_entries(root) if (not args.keys or e["key"] in args.keys)
           and not cache.verify_entry(root / "activations" / e["key"])]
    print("all entries verify" if not bad else f"corrupt: {', '.join(bad)}")
    return EXIT_OK if not bad else 1
