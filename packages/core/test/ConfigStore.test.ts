import { FileSystem } from "@effect/platform"
import * as NodeFileSystem from "@effect/platform-node/NodeFileSystem"
import { assert, describe, it } from "@effect/vitest"
import { Effect, Either, Exit, Option } from "effect"
import * as ChildProcess from "node:child_process"
import * as Path from "node:path"
import * as Url from "node:url"
import * as ConfigStore from "../src/ConfigStore.js"
import * as VmConfig from "../src/VmConfig.js"
import * as configs from "./fixtures/configs.js"

const here = Path.dirname(Url.fileURLToPath(import.meta.url))
const root = Path.resolve(here, "../../..")
const tsx = Path.join(root, "node_modules/.bin/tsx")
const child = Path.join(here, "fixtures/lockChild.ts")

/** A temp dir with `files`, and a store over it. */
const setup = (files: Record<string, string>, options?: Partial<ConfigStore.ConfigStoreOptions>) =>
  Effect.gen(function*() {
    const fs = yield* FileSystem.FileSystem
    const dir = yield* fs.makeTempDirectoryScoped({ prefix: "cfgstore-" })
    for (const [name, text] of Object.entries(files)) {
      yield* fs.makeDirectory(Path.dirname(Path.join(dir, name)), { recursive: true })
      yield* fs.writeFileString(Path.join(dir, name), text)
    }
    const store = yield* ConfigStore.make({ dir, ...options })
    return { fs, dir, store }
  })

const runChild = (args: ReadonlyArray<string>) =>
  Effect.async<{ readonly result: string; readonly [k: string]: unknown }, Error>((resume) => {
    const proc = ChildProcess.execFile(tsx, [child, ...args], { cwd: root, timeout: 60_000 }, (error, stdout) => {
      if (error !== null && stdout.trim() === "") return resume(Effect.fail(error))
      resume(Effect.try(() => JSON.parse(stdout.trim().split("\n").pop()!)))
    })
    return Effect.sync(() => proc.kill("SIGKILL"))
  })

const provide = Effect.provide(NodeFileSystem.layer)

describe("ConfigStore", () => {
  it.scopedLive("loads, locks and unlocks a config", () =>
    Effect.gen(function*() {
      const { dir, fs, store } = yield* setup({ "101.conf": configs.seabios, "100.conf": configs.full })
      assert.strictEqual(store.configPath(101), Path.join(dir, "101.conf"))
      assert.deepStrictEqual(yield* store.list, [100, 101])

      const loaded = yield* store.load(101)
      assert.strictEqual(loaded.vmid, 101)
      assert.strictEqual(VmConfig.main(loaded).guestName, "small")

      const locked = yield* store.setLock(101, "backup")
      assert.strictEqual(VmConfig.main(locked).lock, "backup")
      const onDisk = yield* fs.readFileString(Path.join(dir, "101.conf"))
      assert.strictEqual(onDisk, configs.seabios.replace("memory: 512\n", "lock: backup\nmemory: 512\n"))
      assert.strictEqual(VmConfig.main(yield* store.load(101)).lock, "backup")

      const unlocked = yield* store.removeLock(101, "backup")
      assert.strictEqual(VmConfig.main(unlocked).lock, undefined)
      assert.strictEqual(yield* fs.readFileString(Path.join(dir, "101.conf")), configs.seabios)
      // no temp or lock files left behind
      assert.deepStrictEqual((yield* fs.readDirectory(dir)).sort(), ["100.conf", "101.conf"])
    }).pipe(provide))

  it.scopedLive("refuses a VM that holds a lock, naming it", () =>
    Effect.gen(function*() {
      const { store } = yield* setup({ "100.conf": configs.full })
      const error = yield* Effect.flip(store.setLock(100, "backup"))
      assert.strictEqual(error._tag, "VmLockError")
      assert.strictEqual(error.message, "VM is locked (backup)")
      if (error._tag === "VmLockError") {
        assert.strictEqual(error.reason, "Locked")
        assert.strictEqual(error.lock, "backup")
      }
      const mismatch = yield* Effect.flip(store.removeLock(100, "snapshot"))
      assert.strictEqual(mismatch.message, "found lock 'backup' trying to remove 'snapshot' lock")
      yield* store.removeLock(100)
      const none = yield* Effect.flip(store.removeLock(100, "backup"))
      assert.strictEqual(none.message, "no lock found trying to remove 'backup'  lock")
      assert.strictEqual((yield* Effect.flip(store.removeLock(100))).message, "no lock found trying to remove any lock")
    }).pipe(provide))

  it.scopedLive("reports missing and malformed configs with typed errors", () =>
    Effect.gen(function*() {
      const { dir, store } = yield* setup({ "102.conf": "name: a\nbroken line\n" })
      const missing = yield* Effect.flip(store.load(100))
      assert.strictEqual(missing._tag, "VmConfigNotFound")
      assert.strictEqual(missing.message, `Configuration file '${Path.join(dir, "100.conf")}' does not exist`)
      assert.strictEqual((yield* Effect.flip(store.setLock(100, "backup")))._tag, "VmConfigNotFound")
      const malformed = yield* Effect.flip(store.load(102))
      assert.strictEqual(malformed._tag, "VmConfigParseError")
      if (malformed._tag === "VmConfigParseError") {
        assert.strictEqual(malformed.line, 2)
        assert.strictEqual(malformed.text, "broken line")
        assert.strictEqual(malformed.path, Path.join(dir, "102.conf"))
      }
      // a malformed config is never rewritten
      assert.strictEqual((yield* Effect.flip(store.setLock(102, "backup")))._tag, "VmConfigParseError")
    }).pipe(provide))

  it.scopedLive("reads the firewall file when there is one", () =>
    Effect.gen(function*() {
      const { dir } = yield* setup({ "100.conf": "name: a\n", "fw/100.fw": "[OPTIONS]\nenable: 1\n" })
      const store = yield* ConfigStore.make({ dir, firewallDir: Path.join(dir, "fw") })
      assert.deepStrictEqual(yield* store.readFirewall(100), Option.some("[OPTIONS]\nenable: 1\n"))
      assert.deepStrictEqual(yield* store.readFirewall(101), Option.none())
      const noFirewallDir = yield* ConfigStore.make({ dir })
      assert.deepStrictEqual(yield* noFirewallDir.readFirewall(100), Option.none())
    }).pipe(provide))

  it.scopedLive("keeps the file mode and writes atomically", () =>
    Effect.gen(function*() {
      const { dir, fs, store } = yield* setup({ "100.conf": "name: a\n" })
      const file = Path.join(dir, "100.conf")
      yield* fs.chmod(file, 0o600)
      const before = yield* fs.stat(file)
      yield* store.setLock(100, "backup")
      const after = yield* fs.stat(file)
      assert.strictEqual(after.mode & 0o777, 0o600)
      // replaced by rename: a new inode
      assert.notStrictEqual(Option.getOrUndefined(after.ino), Option.getOrUndefined(before.ino))
    }).pipe(provide))

  it.scopedLive("lets exactly one of many concurrent fibers lock, through one store or several", () =>
    Effect.gen(function*() {
      const { dir, store } = yield* setup({ "100.conf": "name: a\n", "101.conf": "name: b\n" })
      const results = yield* Effect.all(
        Array.from({ length: 16 }, () => Effect.either(store.setLock(100, "backup"))),
        { concurrency: "unbounded" }
      )
      assert.strictEqual(results.filter(Either.isRight).length, 1)
      for (const r of results.filter(Either.isLeft)) assert.strictEqual(r.left.message, "VM is locked (backup)")

      // separate stores share nothing in memory: only the lock file serialises them
      const stores = yield* Effect.all(Array.from({ length: 8 }, () => ConfigStore.make({ dir })))
      const across = yield* Effect.all(stores.map((s) => Effect.either(s.setLock(101, "backup"))), {
        concurrency: "unbounded"
      })
      assert.strictEqual(across.filter(Either.isRight).length, 1)
      const text = yield* (yield* FileSystem.FileSystem).readFileString(Path.join(dir, "101.conf"))
      assert.strictEqual(text, "lock: backup\nname: b\n")
    }).pipe(provide))

  it.scopedLive("holds the lock for a scope with locked()", () =>
    Effect.gen(function*() {
      const { store } = yield* setup({ "100.conf": "name: a\n" })
      const inside = yield* Effect.scoped(
        Effect.gen(function*() {
          const config = yield* ConfigStore.locked(100)
          assert.strictEqual(VmConfig.main(config).lock, "backup")
          return VmConfig.main(yield* store.load(100)).lock
        })
      ).pipe(Effect.provideService(ConfigStore.ConfigStore, store))
      assert.strictEqual(inside, "backup")
      assert.strictEqual(VmConfig.main(yield* store.load(100)).lock, undefined)

      // released on failure too
      const failed = yield* Effect.exit(Effect.scoped(
        Effect.zipRight(ConfigStore.locked(100), Effect.fail("boom"))
      ).pipe(Effect.provideService(ConfigStore.ConfigStore, store)))
      assert.strictEqual(Exit.isFailure(failed), true)
      assert.strictEqual(VmConfig.main(yield* store.load(100)).lock, undefined)
    }).pipe(provide))

  it.scopedLive("waits for a live holder of the lock file and times out", () =>
    Effect.gen(function*() {
      const { dir, fs, store } = yield* setup({ "100.conf": "name: a\n" }, { lockTimeout: "300 millis" })
      const lockFile = Path.join(dir, ".lock-100.conf")
      // held by this (live) process under another token
      yield* fs.writeFileString(lockFile, `${process.pid} someoneelse\n`)
      const error = yield* Effect.flip(store.setLock(100, "backup"))
      assert.strictEqual(error._tag, "ConfigStoreError")
      assert.strictEqual(error.message, `can't lock file '${lockFile}' - got timeout`)
      assert.strictEqual(yield* fs.readFileString(lockFile), `${process.pid} someoneelse\n`)
      assert.strictEqual(yield* fs.readFileString(Path.join(dir, "100.conf")), "name: a\n")
      // once it is released, locking works
      yield* fs.remove(lockFile)
      yield* store.setLock(100, "backup")
    }).pipe(provide))

  it.scopedLive("takes over a lock file left by a dead process", () =>
    Effect.gen(function*() {
      const { dir, fs, store } = yield* setup({ "100.conf": "name: a\n" }, { lockTimeout: "5 seconds" })
      const dead = ChildProcess.spawnSync("true")
      assert.strictEqual(dead.status, 0)
      const lockFile = Path.join(dir, ".lock-100.conf")
      yield* fs.writeFileString(lockFile, `${dead.pid} leftover\n`)
      yield* store.setLock(100, "backup")
      assert.strictEqual(yield* fs.exists(lockFile), false)
      assert.deepStrictEqual((yield* fs.readDirectory(dir)).sort(), ["100.conf"])
    }).pipe(provide))

  it.scopedLive("serialises separate processes", () =>
    Effect.gen(function*() {
      const { dir, fs } = yield* setup({ "100.conf": configs.seabios, "101.conf": "name: b\n" })
      // several processes race for one VM: one wins, the others see the lock
      const racers = yield* Effect.all(Array.from({ length: 3 }, () => runChild([dir, "100", "once"])), {
        concurrency: "unbounded"
      })
      assert.deepStrictEqual(racers.map((r) => r.result).sort(), ["VmLockError", "VmLockError", "ok"])
      assert.strictEqual(
        yield* fs.readFileString(Path.join(dir, "100.conf")),
        configs.seabios.replace("memory: 512\n", "lock: backup\nmemory: 512\n")
      )

      // processes take turns holding `lock: backup`; their critical sections never overlap
      const log = Path.join(dir, "critical.log")
      const cyclers = yield* Effect.all(
        Array.from({ length: 2 }, () => runChild([dir, "101", "cycle", "8", log])),
        { concurrency: "unbounded" }
      )
      assert.deepStrictEqual(cyclers.map((r) => [r.result, r.held]), [["ok", 8], ["ok", 8]])
      const lines = (yield* fs.readFileString(log)).trimEnd().split("\n")
      assert.strictEqual(lines.length, 32)
      for (let i = 0; i < lines.length; i += 2) {
        const [enter, pidIn] = lines[i]!.split(" ")
        const [exit, pidOut] = lines[i + 1]!.split(" ")
        assert.deepStrictEqual([enter, exit, pidIn], ["enter", "exit", pidOut])
      }
      assert.strictEqual(yield* fs.readFileString(Path.join(dir, "101.conf")), "name: b\n")
    }).pipe(provide), 120_000)
})
