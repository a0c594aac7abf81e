// swift-tools-version:6.0
import PackageDescription

let release: [SwiftSetting] = [
    .unsafeFlags(["-enforce-exclusivity=unchecked", "-cross-module-optimization"], .when(configuration: .release)),
]

let package = Package(
    name: "tether",
    platforms: [.macOS(.v14)],
    products: [
        .executable(name: "tether", targets: ["tether"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-collections.git", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        // NIOHPACK: an independent HPACK encoder and decoder for the HTTP/2 tests (never in the binary).
        .package(url: "https://github.com/apple/swift-nio-http2.git", from: "1.46.0"),
    ],
    targets: [
        // PCRE2 with JIT for `location ~` (Debian: libpcre2-dev), as nginx uses it.
        .systemLibrary(name: "CPCRE2", pkgConfig: "libpcre2-8", providers: [.apt(["libpcre2-dev"])]),
        .target(name: "TetherConfig", dependencies: ["CPCRE2"], swiftSettings: release),
        // glibc functions Swift's Glibc module leaves out (malloc_trim, mallinfo2).
        .target(name: "CTether"),
        // Tether's own event loop: epoll, slab records with generation tags, timer lists, eventfd
        // wake-ups, accept with back-off. No HTTP, no NIO.
        .target(name: "TetherIO", dependencies: ["CTether"], swiftSettings: release),
        // HTTP/1 pieces without I/O: the request target and path normalisation, the chunked
        // decoder, body framing. Stdlib only.
        .target(name: "TetherHTTP", swiftSettings: release),
        // HTTP/2 without I/O (RFC 9113): frames, the connection's state machine with flow control
        // and its defences, and the mapping of a stream's fields to and from HTTP/1.1 heads.
        .target(
            name: "TetherH2",
            swiftSettings: release
        ),
        // The system's OpenSSL 3 (Debian: libssl-dev). Not swift-nio-ssl, which bundles BoringSSL.
        .systemLibrary(name: "COpenSSL", pkgConfig: "openssl", providers: [.apt(["libssl-dev"])]),
        .target(
            name: "TetherTLS",
            dependencies: ["COpenSSL", "TetherIO"],
            swiftSettings: release
        ),
        // Operations tools, out of the core: `tether doctor` and the host probes (/proc).
        .target(name: "TetherOps", dependencies: ["TetherConfig"], swiftSettings: release),
        .target(
            name: "TetherPool",
            dependencies: [.product(name: "DequeModule", package: "swift-collections")],
            swiftSettings: release
        ),
        .target(
            name: "TetherCore",
            dependencies: [
                "TetherConfig", "TetherPool", "TetherTLS", "TetherHTTP", "TetherH2", "TetherIO", "TetherOps", "CTether",
            ],
            swiftSettings: release
        ),
        .target(
            name: "TetherAdmin",
            dependencies: ["TetherCore", "TetherPool"],
            swiftSettings: release
        ),
        .executableTarget(
            name: "tether",
            dependencies: [
                "TetherConfig", "TetherCore", "TetherAdmin", "TetherIO", "TetherOps",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: release
        ),
        .target(
            name: "TetherTestSupport",
            dependencies: [
                "COpenSSL", "TetherH2", "CTether",
                .product(name: "NIOHPACK", package: "swift-nio-http2"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ],
            path: "Tests/TetherTestSupport",
            // Checksumming hundreds of megabytes must not dominate a debug test run.
            swiftSettings: [.unsafeFlags(["-O"])]
        ),
        .testTarget(name: "TetherConfigTests", dependencies: ["TetherConfig"]),
        .testTarget(name: "TetherPoolTests", dependencies: ["TetherPool"]),
        .testTarget(name: "TetherIOTests", dependencies: ["TetherIO", "CTether"]),
        .testTarget(name: "TetherHTTPTests", dependencies: ["TetherHTTP"]),
        .testTarget(name: "TetherH2Tests", dependencies: ["TetherH2", .product(name: "NIOHPACK", package: "swift-nio-http2"), .product(name: "NIOCore", package: "swift-nio")]),
        .testTarget(
            name: "TetherCoreTests",
            dependencies: ["TetherCore", "TetherHTTP", "TetherPool", "TetherIO", "TetherTLS", "TetherTestSupport"]
        ),
        .testTarget(
            name: "TetherIntegrationTests",
            dependencies: [
                "TetherCore", "TetherConfig", "TetherAdmin", "TetherTestSupport", "TetherIO", "TetherTLS",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ]
        ),
    ]
)
