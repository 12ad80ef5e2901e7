import * as fs from "node:fs"
import * as path from "node:path"
import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import * as VmaInput from "../src/VmaInput.js"
import * as VmaReader from "../src/VmaReader.js"
import * as VmaWriter from "../src/VmaWriter.js"
import {
  CLUSTER,
  cli,
  clusterOps,
  encodeBytes,
  extentOffsets,
  fixExtentMd5,
  fixHeaderMd5,
  makeImage,
  tempDir,
  verifyBytes
} from "./utils.js"

// Two devices: 70 clusters (cluster 5 all zero) and an unaligned 200 000 bytes whose last cluster stores
// only its first block. Written in order: extents of 58 and 16 clusters.
const disk1 = makeImage(70 * CLUSTER, 21)
disk1.fill(0, 5 * CLUSTER, 6 * CLUSTER)
const disk2 = makeImage(200_000, 22)
disk2.fill(0x5a, 196_608, 200_000)

const base = Effect.runSync(encodeBytes(clusterOps([disk1, disk2]), {
  configs: [{ name: "qemu-server.conf", data: "name: vm\n" }, { name: "qemu-server.fw", data: "[OPTIONS]\n" }],
  devices: [{ name: "drive-scsi0", size: disk1.length }, { name: "drive-scsi1", size: disk2.length }]
}))
const H = new DataView(base.buffer, base.byteOffset).getUint32(56)
const extents = extentOffsets(base)
const last = extents[extents.length - 1]!

const view = (b: Uint8Array) => new DataView(b.buffer, b.byteOffset, b.length)
const slotOffset = (ext: number, slot: number) => ext + 40 + 8 * slot
/** The slot of `(dev, cluster)` in the extent at `ext`. */
const findSlot = (b: Uint8Array, ext: number, dev: number, cluster: number) => {
  for (let s = 0; s < 59; s++) {
    const off = slotOffset(ext, s)
    if (b[off + 3] === dev && view(b).getUint32(off + 4) === cluster) return off
  }
  throw new Error(`no slot for ${dev}/${cluster}`)
}

type Corruption = (b: Uint8Array) => Uint8Array | void

interface Case {
  readonly name: string
  readonly tag: string
  readonly corrupt: Corruption
  readonly fields?: Record<string, unknown>
}

const cases: ReadonlyArray<Case> = [
  { name: "stream ends inside the fixed header", tag: "VmaHeaderTruncated", corrupt: (b) => b.slice(0, 8000) },
  { name: "stream ends inside the blob area", tag: "VmaHeaderTruncated", corrupt: (b) => b.slice(0, H - 10) },
  { name: "wrong magic", tag: "VmaBadMagic", corrupt: (b) => void (b[1] = 0x00) },
  { name: "header_size without blob area", tag: "VmaBadHeaderSize", corrupt: (b) => view(b).setUint32(56, 12288) },
  {
    name: "header_size of 4 GiB",
    tag: "VmaBadHeaderSize",
    fields: { headerSize: 0xffffffff },
    corrupt: (b) => view(b).setUint32(56, 0xffffffff)
  },
  { name: "flipped header byte", tag: "VmaHeaderChecksumMismatch", corrupt: (b) => void (b[100] = 1) },
  {
    name: "version 2",
    tag: "VmaUnsupportedVersion",
    fields: { version: 2 },
    corrupt: (b) => {
      view(b).setUint32(4, 2)
      fixHeaderMd5(b)
    }
  },
  {
    name: "blob buffer inside the fixed part",
    tag: "VmaBadBlobBuffer",
    fields: { reason: "Offset" },
    corrupt: (b) => {
      view(b).setUint32(48, 4096)
      fixHeaderMd5(b)
    }
  },
  {
    name: "blob buffer past header_size",
    tag: "VmaBadBlobBuffer",
    fields: { reason: "Size" },
    corrupt: (b) => {
      view(b).setUint32(52, H)
      fixHeaderMd5(b)
    }
  },
  {
    name: "config data pointer not at a blob",
    tag: "VmaInvalidConfigPointer",
    fields: { slot: 0, dataPointer: 3 },
    corrupt: (b) => {
      view(b).setUint32(3068, 3)
      fixHeaderMd5(b)
    }
  },
  {
    name: "config name pointer to the data blob (no NUL)",
    tag: "VmaInvalidConfigPointer",
    fields: { slot: 1 },
    corrupt: (b) => {
      view(b).setUint32(2044 + 4, view(b).getUint32(3068 + 4))
      fixHeaderMd5(b)
    }
  },
  {
    name: "device name without NUL",
    tag: "VmaInvalidDeviceEntry",
    fields: { reason: "InvalidName", devId: 1 },
    corrupt: (b) => {
      const p = 12288 + view(b).getUint32(4096 + 32)
      const len = b[p]! | (b[p + 1]! << 8)
      b[p + 2 + len - 1] = 0x41
      fixHeaderMd5(b)
    }
  },
  {
    name: "device in reserved slot 255",
    tag: "VmaInvalidDeviceEntry",
    fields: { reason: "ReservedId", devId: 255 },
    corrupt: (b) => {
      b.copyWithin(4096 + 32 * 255, 4096 + 32 * 2, 4096 + 32 * 3)
      fixHeaderMd5(b)
    }
  },
  {
    name: "stream ends inside an extent header",
    tag: "VmaTruncatedExtent",
    fields: { offset: last, expected: 512, actual: 100 },
    corrupt: (b) => b.slice(0, last + 100)
  },
  {
    name: "stream ends inside an extent's data",
    tag: "VmaTruncatedExtent",
    fields: { offset: last },
    corrupt: (b) => b.slice(0, b.length - 100)
  },
  {
    name: "wrong extent magic",
    tag: "VmaBadExtentMagic",
    fields: { reason: "Magic", offset: H },
    corrupt: (b) => void (b[H + 3] = 0x46)
  },
  {
    name: "extent reserved field set",
    tag: "VmaBadExtentMagic",
    fields: { reason: "Reserved", offset: last },
    corrupt: (b) => {
      b[last + 5] = 1
      fixExtentMd5(b, last)
    }
  },
  {
    name: "flipped blockinfo byte",
    tag: "VmaExtentChecksumMismatch",
    fields: { offset: H },
    corrupt: (b) => void (b[slotOffset(H, 3) + 7]! ^= 1)
  },
  {
    name: "foreign extent uuid",
    tag: "VmaExtentUuidMismatch",
    fields: { offset: last },
    corrupt: (b) => {
      b[last + 8]! ^= 0xff
      fixExtentMd5(b, last)
    }
  },
  {
    name: "block_count one less than the masks",
    tag: "VmaBlockCountMismatch",
    fields: { offset: H },
    corrupt: (b) => {
      view(b).setUint16(H + 6, view(b).getUint16(H + 6) - 1)
      fixExtentMd5(b, H)
    }
  },
  {
    name: "block_count 65535 (not read before the check)",
    tag: "VmaBlockCountMismatch",
    fields: { offset: last, blockCount: 65535 },
    corrupt: (b) => {
      view(b).setUint16(last + 6, 65535)
      fixExtentMd5(b, last)
    }
  },
  {
    name: "unknown device id",
    tag: "VmaUnknownDevice",
    fields: { offset: H, slot: 2, devId: 9 },
    corrupt: (b) => {
      b[slotOffset(H, 2) + 3] = 9
      fixExtentMd5(b, H)
    }
  },
  {
    name: "cluster number past the device end",
    tag: "VmaClusterOutOfRange",
    fields: { offset: H, devId: 1, cluster: 5000, clusterCount: 70 },
    corrupt: (b) => {
      view(b).setUint32(slotOffset(H, 4) + 4, 5000)
      fixExtentMd5(b, H)
    }
  },
  {
    name: "duplicated cluster",
    tag: "VmaDuplicateCluster",
    fields: { offset: H, device: "drive-scsi0", cluster: 0 },
    corrupt: (b) => {
      view(b).setUint32(slotOffset(H, 1) + 4, 0)
      fixExtentMd5(b, H)
    }
  },
  {
    name: "mask bit for a block past the device end",
    tag: "VmaWriteBeyondEnd",
    fields: { offset: last, device: "drive-scsi1", cluster: 3, block: 1 },
    corrupt: (b) => {
      const slot = findSlot(b, last, 2, 3)
      assert.strictEqual(view(b).getUint16(slot), 1)
      view(b).setUint16(slot, 2)
      fixExtentMd5(b, last)
    }
  },
  {
    name: "last extent removed",
    tag: "VmaMissingCluster",
    fields: { device: "drive-scsi0", cluster: 58, missing: 12 },
    corrupt: (b) => b.slice(0, last)
  },
  {
    name: "an all-zero cluster's entry removed",
    tag: "VmaMissingCluster",
    fields: { device: "drive-scsi0", cluster: 5, missing: 1 },
    corrupt: (b) => {
      const slot = findSlot(b, H, 1, 5)
      assert.strictEqual(view(b).getUint16(slot), 0)
      b.fill(0, slot, slot + 8)
      fixExtentMd5(b, H)
    }
  }
]

const corrupted = (c: Case) => {
  const copy = Uint8Array.from(base)
  return c.corrupt(copy) ?? copy
}

describe("corrupted archives", () => {
  it.effect("the base archive is valid", () =>
    Effect.gen(function*() {
      assert.strictEqual(extents.length, 2)
      const stats = yield* verifyBytes(base)
      assert.strictEqual(stats.clusters, 74)
    }))

  for (const c of cases) {
    it.scopedLive(`${c.name}: ${c.tag} from verify and extract`, () =>
      Effect.gen(function*() {
        const bad = corrupted(c)
        const verifyError = yield* Effect.flip(verifyBytes(bad))
        assert.strictEqual(verifyError._tag, c.tag, verifyError.message)
        for (const [k, v] of Object.entries(c.fields ?? {})) {
          assert.deepStrictEqual((verifyError as unknown as Record<string, unknown>)[k], v, k)
        }
        const dir = yield* tempDir
        const file = path.join(dir, "bad.vma")
        fs.writeFileSync(file, bad)
        const extractError = yield* Effect.flip(Effect.scoped(
          Effect.flatMap(Effect.flatMap(VmaInput.file(file), VmaReader.open), (archive) =>
            VmaReader.extract(archive, { directory: path.join(dir, "x") }))
        ))
        assert.strictEqual(extractError._tag, c.tag)
        assert.isFalse(fs.existsSync(path.join(dir, "x", "disk-drive-scsi0.raw")), "no final disk file on failure")
      }))
  }

  it.scopedLive("CLI: verify and extract print one line and exit 1; verify catches missing clusters", () =>
    Effect.gen(function*() {
      const dir = yield* tempDir
      const file = path.join(dir, "bad.vma")
      fs.writeFileSync(file, base.slice(0, last))
      const verify = yield* cli("verify", file)
      assert.strictEqual(verify.code, 1)
      assert.strictEqual(
        verify.stderr,
        "verify failed - detected missing cluster 58 for stream drive-scsi0 " +
          `(12 missing in total, stream ended at offset ${last})\n`
      )
      const checksum = Uint8Array.from(base)
      checksum[slotOffset(H, 0) + 7]! ^= 1
      fs.writeFileSync(file, checksum)
      const extract = yield* cli("extract", file, path.join(dir, "x"))
      assert.strictEqual(extract.code, 1)
      assert.strictEqual(extract.stderr, `restore failed - wrong vma extent header chechsum (extent at offset ${H})\n`)
      fs.writeFileSync(file, Uint8Array.from(base).fill(0x20, 0, 4))
      const list = yield* cli("list", file)
      assert.strictEqual(list.code, 1)
      assert.strictEqual(list.stderr, "not a vma file - wrong magic number (at offset 0: 20202020)\n")
    }))

  it.effect("writer and reader agree on every cluster of an archive with random writes", () =>
    Effect.gen(function*() {
      const ops = clusterOps([disk1]).reverse()
      const bytes = yield* encodeBytes(ops, { devices: [{ name: "d", size: disk1.length }] })
      assert.strictEqual((yield* verifyBytes(bytes)).clusters, 70)
      const twice = yield* Effect.flip(encodeBytes([...ops, VmaWriter.cluster(1, 0, null)], {
        devices: [{ name: "d", size: disk1.length }]
      }))
      assert.strictEqual(twice.reason, "DuplicateCluster")
    }))
})
