import { createHash } from "node:crypto"
import { assert, describe, it } from "@effect/vitest"
import { Effect } from "effect"
import * as VmaWriter from "../src/VmaWriter.js"
import { BLOCK, CLUSTER, clusterOps, encodeBytes, extentOffsets, makeImage } from "./utils.js"

const uuid = "0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0"
const ctime = 1_700_000_000
const conf = "name: vm\nmemory: 512\n#qmdump#map:scsi0:drive-scsi0:local:raw:\n"

const md5 = (b: Uint8Array) => createHash("md5").update(b).digest("hex")
const u32 = (b: Uint8Array, off: number) => new DataView(b.buffer, b.byteOffset).getUint32(off)
const u16 = (b: Uint8Array, off: number) => new DataView(b.buffer, b.byteOffset).getUint16(off)
const u64 = (b: Uint8Array, off: number) => new DataView(b.buffer, b.byteOffset).getBigUint64(off)

describe("VMA layout", () => {
  it.effect("main header: fields, blob buffer and MD5 as QEMU's writer lays them out", () =>
    Effect.gen(function*() {
      const image = makeImage(3 * CLUSTER)
      const bytes = yield* encodeBytes(clusterOps([image]), {
        uuid,
        ctime,
        configs: [{ name: "/tmp/dir/qemu-server.conf", data: conf }],
        devices: [{ name: "drive-scsi0", size: image.length }]
      })
      assert.deepStrictEqual([...bytes.subarray(0, 4)], [0x56, 0x4d, 0x41, 0x00])
      assert.strictEqual(u32(bytes, 4), 1)
      assert.strictEqual(Buffer.from(bytes.subarray(8, 24)).toString("hex"), uuid.replace(/-/g, ""))
      assert.strictEqual(Number(u64(bytes, 24)), ctime)
      assert.strictEqual(u32(bytes, 48), 12288)
      // blobs: name (17 bytes with NUL) at 1, data at 20, device name at 20 + 2 + data length
      const blobSize = 1 + (2 + 17) + (2 + conf.length) + (2 + "drive-scsi0".length + 1)
      assert.strictEqual(u32(bytes, 52), blobSize)
      // QEMU grows the blob area by 512 bytes per blob that does not fit: three small blobs, 512 bytes.
      const headerSize = u32(bytes, 56)
      assert.strictEqual(headerSize, 12288 + 512)
      assert.strictEqual(u32(bytes, 2044), 1)
      assert.strictEqual(u32(bytes, 3068), 20)
      assert.strictEqual(u32(bytes, 2048), 0)
      const blob = (p: number) => {
        const at = 12288 + p
        const len = bytes[at]! | (bytes[at + 1]! << 8)
        return Buffer.from(bytes.subarray(at + 2, at + 2 + len))
      }
      assert.strictEqual(blob(1).toString(), "qemu-server.conf\0")
      assert.strictEqual(blob(20).toString(), conf)
      const devPtr = u32(bytes, 4096 + 32)
      assert.strictEqual(devPtr, 20 + 2 + conf.length)
      assert.strictEqual(blob(devPtr).toString(), "drive-scsi0\0")
      assert.strictEqual(Number(u64(bytes, 4096 + 32 + 8)), image.length)
      assert.strictEqual(u32(bytes, 4096), 0) // dev_info[0] unused
      // zero padding after the used blob bytes, reserved areas zero
      assert.isTrue(bytes.subarray(12288 + blobSize, headerSize).every((b) => b === 0))
      assert.isTrue(bytes.subarray(60, 2044).every((b) => b === 0))
      // MD5 over the header with the MD5 field zeroed
      const copy = Uint8Array.from(bytes.subarray(0, headerSize))
      copy.fill(0, 32, 48)
      assert.strictEqual(Buffer.from(bytes.subarray(32, 48)).toString("hex"), md5(copy))
    }))

  it.effect("a large config grows the blob area in 512-byte steps like QEMU", () =>
    Effect.gen(function*() {
      const bytes = yield* encodeBytes([], {
        uuid,
        ctime,
        configs: [{ name: "qemu-server.conf", data: "x".repeat(1000) }, { name: "qemu-server.fw", data: "y" }]
      })
      // name 17+2 -> 512; data 1002 -> +1024; fw name 15+2 fits; fw data 3 fits: 1536
      assert.strictEqual(u32(bytes, 56), 12288 + 1536)
      assert.strictEqual(u32(bytes, 52), 1 + 19 + 1002 + 17 + 3)
    }))

  it.effect("extents: 58 clusters each, only non-zero 4 KiB blocks stored, blockinfo mask/dev/cluster", () =>
    Effect.gen(function*() {
      const clusters = 130
      const image = makeImage(clusters * CLUSTER, 7)
      const bytes = yield* encodeBytes(clusterOps([image]), {
        uuid,
        ctime,
        configs: [{ name: "qemu-server.conf", data: conf }],
        devices: [{ name: "drive-scsi0", size: image.length }]
      })
      const offsets = extentOffsets(bytes)
      assert.strictEqual(offsets.length, 3)
      let seen = 0
      let end = 0
      for (const off of offsets) {
        const ext = bytes.subarray(off, off + 512)
        assert.strictEqual(Buffer.from(ext.subarray(0, 4)).toString("latin1"), "VMAE")
        assert.strictEqual(u16(ext, 4), 0)
        assert.deepStrictEqual([...ext.subarray(8, 24)], [...bytes.subarray(8, 24)])
        const copy = Uint8Array.from(ext)
        copy.fill(0, 24, 40)
        assert.strictEqual(Buffer.from(ext.subarray(24, 40)).toString("hex"), md5(copy))
        let blocks = 0
        let data = off + 512
        for (let slot = 0; slot < 59; slot++) {
          const info = u64(ext, 40 + 8 * slot)
          if (info === 0n) continue
          const mask = Number(info >> 48n)
          assert.strictEqual(Number((info >> 40n) & 0xffn), 0)
          assert.strictEqual(Number((info >> 32n) & 0xffn), 1)
          const cluster = Number(info & 0xffffffffn)
          assert.strictEqual(cluster, seen++)
          for (let j = 0; j < 16; j++) {
            const start = cluster * CLUSTER + j * BLOCK
            const source = image.subarray(start, start + BLOCK)
            const zero = source.every((b) => b === 0)
            assert.strictEqual((mask & (1 << j)) === 0, zero, `cluster ${cluster} block ${j}`)
            if (!zero) {
              assert.deepStrictEqual(bytes.subarray(data, data + BLOCK), source)
              data += BLOCK
              blocks++
            }
          }
          assert.isBelow(slot, 58, "slot 58 stays unused like QEMU's writer")
        }
        assert.strictEqual(u16(ext, 6), blocks)
        end = data
      }
      assert.strictEqual(seen, clusters)
      assert.strictEqual(end, bytes.length)
      assert.strictEqual(u16(bytes, offsets[0]! + 6) > 0, true)
    }))

  it.effect("all-zero clusters are mask-0 entries; a diskless archive is the header plus one empty extent", () =>
    Effect.gen(function*() {
      const zeros = yield* encodeBytes([VmaWriter.zeros(1, 0, 2 * CLUSTER)], {
        uuid,
        ctime,
        devices: [{ name: "drive-scsi0", size: 2 * CLUSTER }]
      })
      const [off] = extentOffsets(zeros)
      assert.strictEqual(zeros.length, off! + 512)
      assert.strictEqual(u64(zeros, off! + 40), (1n << 32n) | 0n)
      assert.strictEqual(u64(zeros, off! + 48), (1n << 32n) | 1n)
      assert.strictEqual(u16(zeros, off! + 6), 0)

      const diskless = yield* encodeBytes([], { uuid, ctime, configs: [{ name: "qemu-server.conf", data: conf }] })
      const headerSize = u32(diskless, 56)
      assert.strictEqual(diskless.length, headerSize + 512)
      assert.isTrue(diskless.subarray(headerSize + 40, headerSize + 512).every((b) => b === 0))
      assert.strictEqual(u16(diskless, headerSize + 6), 0)
    }))

  it.effect("unaligned device size: the last partial block is zero-padded, blocks past the end are never stored", () =>
    Effect.gen(function*() {
      const size = 200_000
      const image = makeImage(size, 3)
      image.fill(0xab, 196_608, size) // the last cluster's first block is non-zero up to the device end
      // The caller passes a full 64 KiB buffer with garbage past the device end, as QEMU does.
      const last = new Uint8Array(CLUSTER).fill(0xcd)
      last.set(image.subarray(196_608))
      const ops = [
        ...clusterOps([image.subarray(0, 196_608)]),
        VmaWriter.cluster(1, 3, last)
      ]
      const bytes = yield* encodeBytes(ops, { uuid, ctime, devices: [{ name: "d", size }] })
      const offsets = extentOffsets(bytes)
      const ext = offsets[offsets.length - 1]!
      const info = u64(bytes, ext + 40 + 8 * 3)
      assert.strictEqual(Number(info & 0xffffffffn), 3)
      assert.strictEqual(Number(info >> 48n), 1, "only block 0 of the last cluster is stored")
      const stored = bytes.subarray(bytes.length - BLOCK)
      assert.isTrue(stored.subarray(0, size - 196_608).every((b) => b === 0xab))
      assert.isTrue(stored.subarray(size - 196_608).every((b) => b === 0), "bytes past the device end zeroed")
    }))

  it.effect("the same writes with the same uuid and ctime give the same bytes", () =>
    Effect.gen(function*() {
      const image = makeImage(10 * CLUSTER, 9)
      const options = { uuid, ctime, devices: [{ name: "drive-scsi0", size: image.length }] }
      const a = yield* encodeBytes(clusterOps([image]), options)
      const b = yield* encodeBytes([VmaWriter.data(1, 0, image)], options)
      assert.deepStrictEqual(a, b)
      const random = yield* encodeBytes(clusterOps([image]), { devices: options.devices })
      assert.notDeepEqual(random.subarray(8, 24), a.subarray(8, 24), "a random uuid by default")
    }))
})
