import * as fs from "node:fs"
import * as path from "node:path"
import { randomBytes } from "node:crypto"
import { assert, describe, it } from "@effect/vitest"
import { writeImage } from "@vzdump/core/BackupTarget"
import { Effect } from "effect"
import * as VmaInput from "../src/VmaInput.js"
import * as VmaReader from "../src/VmaReader.js"
import * as VmaTarget from "../src/VmaTarget.js"
import { sha256, sha256File, tempDir } from "./utils.js"

const MiB = 1024 * 1024

describe("VmaTarget", () => {
  it.scopedLive("buffers may be reused after `bufferRetention` bytes: the archive holds what was written", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const dumpdir = path.join(dir, "dump")
      // many small pieces, each buffer reused as soon as the retention allows; holes in between
      const a = randomBytes(40 * MiB + 12_345)
      a.fill(0, 8 * MiB, 9 * MiB)
      const b = randomBytes(3 * MiB + 100_000)
      const target = VmaTarget.make({ dumpdir })
      const { location } = yield* Effect.scoped(Effect.gen(function*() {
        const session = yield* target.open({
          vmid: 100,
          startTime: new Date(),
          configs: [{ name: "qemu-server.conf", data: new TextEncoder().encode("memory: 128\n") }],
          devices: [{ name: "drive-scsi0", size: a.length }, { name: "drive-scsi1", size: b.length }]
        })
        assert.isAbove((yield* writeImage(session, 0, a, 256 * 1024)).reused, 0)
        yield* writeImage(session, 1, b, MiB)
        return yield* session.commit
      }))
      const x = path.join(dir, "x")
      yield* Effect.scoped(Effect.gen(function*() {
        const archive = yield* VmaReader.open(yield* VmaInput.file(location))
        yield* VmaReader.extract(archive, { directory: x })
      }))
      assert.strictEqual(yield* sha256File(path.join(x, "disk-drive-scsi0.raw")), sha256(a))
      assert.strictEqual(yield* sha256File(path.join(x, "disk-drive-scsi1.raw")), sha256(b))
      assert.deepStrictEqual(fs.readdirSync(dumpdir).filter((f) => f.endsWith(".dat")), [])
    }), 60_000)
})
