//! What the server tells Prometheus about pools: each pool's gauges are published from its status by the replica
//! that reconciles it, within a second of each pass (and at every scrape when this server runs no reconciler, so a
//! pool still shows `controller_disabled`).

use chrono::Utc;

use super::App;

impl App {
    /// Has the pool's gauges published within a second (by the demand loop, once however often this is called).
    pub fn publish_soon(&self, pool_id: &str) {
        self.demand.unpublished.lock().expect("unpublished").insert(pool_id.to_string());
    }

    /// Publishes the pool's gauges from its status now.
    pub async fn publish_pool_metrics(&self, pool_id: &str) {
        let Ok(Some(row)) = self.store.get_pool_by_id(pool_id).await else { return };
        let status = match self.status_of(&row).await {
            Ok(status) => status,
            Err(e) => {
                tracing::debug!(pool = %pool_id, error = &e as &dyn std::error::Error, "No status to publish");
                return;
            }
        };
        let now = Utc::now();
        let leases = self
            .store
            .list_leases(pool_id)
            .await
            .map(|l| l.iter().filter(|l| l.lease.expires_at > now).count())
            .unwrap_or_default();
        self.metrics.publish_pool(pool_id, &row.pool.name, &status, leases);
    }

    /// The `/metrics` text.
    pub async fn render_metrics(&self) -> String {
        if !self.config.reconciler_enabled {
            if let Ok(ids) = self.store.list_pool_ids().await {
                for id in ids {
                    self.publish_pool_metrics(&id).await;
                }
            }
        }
        self.metrics.render()
    }
}
