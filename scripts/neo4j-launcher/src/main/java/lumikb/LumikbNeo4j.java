package lumikb;

import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.Map;
import java.util.concurrent.CountDownLatch;

import org.neo4j.configuration.GraphDatabaseSettings;
import org.neo4j.configuration.connectors.BoltConnector;
import org.neo4j.configuration.connectors.BoltConnectorInternalSettings;
import org.neo4j.configuration.connectors.HttpConnector;
import org.neo4j.configuration.connectors.HttpsConnector;
import org.neo4j.configuration.helpers.SocketAddress;
import org.neo4j.dbms.api.DatabaseManagementService;
import org.neo4j.dbms.api.DatabaseManagementServiceBuilder;
import org.neo4j.graphdb.GraphDatabaseService;
import org.neo4j.io.ByteUnit;

/**
 * Runs Neo4j Community (embedded) with only the Bolt connector, on loopback.
 *
 * <p>Why embedded: the dev/CI machines reach Maven Central but no Docker and no
 * Neo4j download site, so the server comes in as Maven artifacts.
 *
 * <p>Usage: {@code java -cp ... lumikb.LumikbNeo4j HOME_DIR [PORT]}. The password
 * for user {@code neo4j} comes from env {@code LUMIKB_NEO4J_PASSWORD}; if it is
 * empty, auth is disabled. Prints {@code LUMIKB_NEO4J_READY ...} once Bolt
 * accepts connections and the password is set. Stops cleanly on SIGTERM.
 */
public final class LumikbNeo4j {

    private LumikbNeo4j() {}

    public static void main(String[] args) throws Exception {
        if (args.length < 1) {
            System.err.println("usage: LumikbNeo4j HOME_DIR [PORT]");
            System.exit(2);
        }
        Path home = Path.of(args[0]).toAbsolutePath();
        int port = args.length > 1 ? Integer.parseInt(args[1]) : 57687;
        String password = System.getenv().getOrDefault("LUMIKB_NEO4J_PASSWORD", "");
        boolean authEnabled = !password.isEmpty();

        long t0 = System.nanoTime();
        Files.createDirectories(home);
        // Our own pid, so the shell script can stop exactly this process.
        Files.writeString(home.resolve("neo4j.pid"),
                ProcessHandle.current().pid() + "\n", StandardCharsets.US_ASCII);

        DatabaseManagementService dbms = new DatabaseManagementServiceBuilder(home)
                // Bolt only, loopback only. HTTP(S) stay off; routing connector and
                // usage reporting are not wanted either.
                .setConfig(BoltConnector.enabled, true)
                .setConfig(BoltConnector.listen_address, new SocketAddress("127.0.0.1", port))
                .setConfig(BoltConnector.advertised_address, new SocketAddress("127.0.0.1", port))
                .setConfig(GraphDatabaseSettings.default_listen_address, new SocketAddress("127.0.0.1"))
                .setConfig(HttpConnector.enabled, false)
                .setConfig(HttpsConnector.enabled, false)
                .setConfig(GraphDatabaseSettings.routing_enabled, false)
                .setConfig(GraphDatabaseSettings.udc_enabled, false)
                .setConfig(GraphDatabaseSettings.auth_enabled, authEnabled)
                // Bolt otherwise waits 5 s twice on shutdown for idle connections
                // and its thread pool; the stores are checkpointed before that.
                .setConfig(BoltConnectorInternalSettings.connection_shutdown_wait_time, Duration.ofSeconds(1))
                .setConfig(BoltConnectorInternalSettings.thread_pool_shutdown_wait_time, Duration.ofSeconds(1))
                // Test/dev sized: the JVM gets -Xmx1g from scripts/services.
                .setConfig(GraphDatabaseSettings.pagecache_memory, ByteUnit.mebiBytes(256))
                // Transaction logs: Neo4j keeps 2 days of them by default
                // (db.tx_log.rotation.retention_policy), which the benchmarks
                // grow to tens of GB. A test database needs no point-in-time
                // recovery, so keep only the newest 128 MiB; logs are pruned
                // at each checkpoint.
                .setConfig(GraphDatabaseSettings.keep_logical_logs, "128M size")
                .setConfig(GraphDatabaseSettings.logical_log_rotation_threshold, ByteUnit.mebiBytes(32))
                .build();

        long tStarted = System.nanoTime();
        CountDownLatch stopped = new CountDownLatch(1);
        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            System.out.println("LumikbNeo4j: shutting down");
            try {
                dbms.shutdown();
            } finally {
                stopped.countDown();
            }
        }, "lumikb-neo4j-shutdown"));

        try {
            if (authEnabled) {
                setPassword(dbms, password);
            }
            // Touch the default database so "ready" really means ready to query
            // (the first Cypher query of a JVM is slow: planner warm-up).
            dbms.database(GraphDatabaseSettings.DEFAULT_DATABASE_NAME).executeTransactionally("RETURN 1");
        } catch (RuntimeException e) {
            // Exit instead of lingering without a ready line (Neo4j's threads would keep the JVM up).
            e.printStackTrace();
            System.exit(1);
        }

        long tReady = System.nanoTime();
        System.out.println("LumikbNeo4j: LUMIKB_NEO4J_READY bolt://127.0.0.1:" + port
                + " auth=" + (authEnabled ? "enabled" : "disabled")
                + " (dbms start " + (tStarted - t0) / 1_000_000 + " ms, first queries "
                + (tReady - tStarted) / 1_000_000 + " ms)");
        System.out.flush();
        stopped.await();
    }

    /**
     * A new store has user neo4j/neo4j with "change required"; set our password
     * through the system database (the embedded API runs with full rights).
     * Neo4j refuses to set the same password again, which on a restart just
     * means it is already set.
     */
    private static void setPassword(DatabaseManagementService dbms, String password) {
        GraphDatabaseService system = dbms.database(GraphDatabaseSettings.SYSTEM_DATABASE_NAME);
        try {
            system.executeTransactionally(
                    "ALTER USER neo4j SET PASSWORD $pw CHANGE NOT REQUIRED", Map.of("pw", password));
            System.out.println("LumikbNeo4j: password for user neo4j set");
        } catch (RuntimeException e) {
            String msg = String.valueOf(e.getMessage());
            if (msg.contains("Old password and new password cannot be the same")) {
                System.out.println("LumikbNeo4j: password for user neo4j already set");
            } else {
                throw e;
            }
        }
    }
}
