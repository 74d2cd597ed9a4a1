"""With the broker down, chat keeps working; once it is back every turn arrives."""

from __future__ import annotations

import time
from pathlib import Path

import openai
import pytest

from services.bus.kafka import KafkaEventBus
from services.bus.typed import EventPublisher
from services.metrics import Metrics
from services.recorder import handlers
from services.settings import GatewaySettings, Topics, WildloopSettings
from services.store.repository import Store
from services.worker import ConsumerWorker
from tests.conftest import TEST_KAFKA
from tests.support.gateway_server import running_gateway
from tests.support.net import free_port
from tests.support.tansu import TansuBroker

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def test_fifty_turns_chatted_during_a_broker_outage_are_all_delivered_once(
    tmp_path: Path, base_model_dir: Path, s3_env: dict[str, str], topics: Topics
) -> None:
    broker = TansuBroker("s3://tansu/", env=s3_env)
    broker.start()
    try:
        kafka = TEST_KAFKA.model_copy(update={"max_block_ms": 2000})
        settings = WildloopSettings(
            data_dir=tmp_path,
            base_model_path=base_model_dir,
            topics=topics,
            kafka_bootstrap=broker.bootstrap,
            kafka=kafka,
            log_format="console",
            gateway=GatewaySettings(port=free_port(), auth_required=False),
        )
        with running_gateway(settings) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            broker.stop()
            started = time.monotonic()
            for i in range(50):
                reply = client.chat.completions.create(
                    model="wildloop",
                    messages=[{"role": "user", "content": f"Say {i}."}],
                    max_tokens=2,
                    temperature=0,
                )
                assert reply.choices[0].message.content is not None
            assert time.monotonic() - started < 120
            broker.start()
            deadline = time.monotonic() + 120
            store = Store.open(f"sqlite:///{tmp_path / 'check.db'}")
            bus = KafkaEventBus([broker.bootstrap], kafka)
            worker = ConsumerWorker(
                subscription=bus.subscribe([topics.chat_turns], group="outage-check"),
                store=store,
                handlers=handlers(store),
                dead_letters=EventPublisher(bus.publisher(), topics),
                metrics=Metrics("check"),
            )
            while store.count_turns() < 100 and time.monotonic() < deadline:
                worker.run(idle_timeout_s=2)
            worker.close()
        assert store.count_turns() == 100  # 50 user + 50 assistant turns, each once
        assert store.count_conversations() == 50
        store.close()
    finally:
        broker.close()
