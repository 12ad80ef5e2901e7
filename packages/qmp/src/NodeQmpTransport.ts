/**
 * `QmpTransport` over Node's `net` (Unix and TCP sockets) through `@effect/platform-node`'s `NodeSocket`.
 *
 * It cannot pass file descriptors: `writeWithFds` fails with `QmpTransportError` (`FdPassingUnsupported`).
 * Use `FdQmpTransport` when `getfd`/`add-fd` must carry a descriptor.
 *
 * @since 0.1.0
 */
import * as NodeSocket from "@effect/platform-node/NodeSocket"
import * as Effect from "effect/Effect"
import * as Layer from "effect/Layer"
import { QmpConnectError, QmpTransportError } from "./QmpError.js"
import { formatAddress, QmpTransport } from "./QmpTransport.js"
import type { QmpConnection, QmpTransportService } from "./QmpTransport.js"

const unsupportedFds = new QmpTransportError({
  reason: "FdPassingUnsupported",
  detail: "NodeQmpTransport cannot send file descriptors; provide FdQmpTransport.layer instead"
})

/**
 * The transport value.
 *
 * @since 0.1.0
 * @category constructors
 */
export const transport: QmpTransportService = QmpTransport.of({
  name: "node",
  supportsFds: false,
  open: (address, options) =>
    NodeSocket.makeNet({
      ...(address._tag === "Unix" ? { path: address.path } : { host: address.host, port: address.port }),
      openTimeout: options.openTimeout
    }).pipe(
      Effect.map((socket): QmpConnection => ({ socket, writeWithFds: () => Effect.fail(unsupportedFds) })),
      Effect.mapError((cause) =>
        new QmpConnectError({ reason: "Open", address: formatAddress(address), detail: cause.message })
      )
    )
})

/**
 * @since 0.1.0
 * @category constructors
 */
export const make: Effect.Effect<QmpTransportService> = Effect.succeed(transport)

/**
 * @since 0.1.0
 * @category layers
 */
export const layer: Layer.Layer<QmpTransport> = Layer.succeed(QmpTransport, transport)
