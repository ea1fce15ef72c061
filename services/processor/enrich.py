"""Enrichment steps: user agent, geo-IP, campaign and referrer, click ids,
bot flag, and IP anonymisation. Each is switched per source
(services.common.sources.Enrichment); all write under the event's context."""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus, urlsplit

import maxminddb
import ua_parser

from services.common.sources import Enrichment

FLAG_IP_INVALID = "ip_invalid"

# Crawlers, monitors, headless browsers and HTTP libraries that are not people.
_BOT_UA = re.compile(
    r"bot\b|bot/|spider|crawl|slurp|scrape|archiver|facebookexternalhit|embedly|preview|"
    r"headlesschrome|phantomjs|puppeteer|playwright|selenium|lighthouse|pingdom|uptime|"
    r"monitor|statuscake|datadog|newrelic|curl/|wget/|python-requests|python-urllib|aiohttp/|"
    r"httpx/|go-http-client|okhttp|java/|libwww|apache-httpclient|node-fetch|axios/",
    re.IGNORECASE,
)

SEARCH_HOSTS = (
    "google.",
    "bing.com",
    "duckduckgo.com",
    "search.yahoo.",
    "yandex.",
    "baidu.com",
    "ecosia.org",
    "qwant.com",
    "search.brave.com",
    "startpage.com",
)
SOCIAL_HOSTS = (
    "facebook.com",
    "fb.com",
    "instagram.com",
    "t.co",
    "twitter.com",
    "x.com",
    "linkedin.com",
    "lnkd.in",
    "reddit.com",
    "pinterest.",
    "youtube.com",
    "tiktok.com",
    "news.ycombinator.com",
    "mastodon.social",
    "threads.net",
)
EMAIL_HOSTS = ("mail.google.com", "outlook.live.com", "outlook.office.com", "mail.yahoo.com", "mail.proton.me")

UTM_KEYS = {
    "utm_source": "source",
    "utm_medium": "medium",
    "utm_campaign": "name",
    "utm_term": "term",
    "utm_content": "content",
    "utm_id": "id",
}
CLICK_IDS = ("gclid", "fbclid", "msclkid")


def _host_matches(host: str, patterns: tuple[str, ...]) -> bool:
    for pattern in patterns:
        if pattern.endswith("."):
            if host.startswith(pattern) or f".{pattern}" in host:
                return True
        elif host == pattern or host.endswith("." + pattern):
            return True
    return False


@functools.lru_cache(maxsize=4096)
def referrer_medium(host: str, page_host: str | None) -> str:
    if page_host and (host == page_host or host.endswith("." + page_host)):
        return "internal"
    if _host_matches(host, EMAIL_HOSTS):
        return "email"
    if _host_matches(host, SEARCH_HOSTS):
        return "search"
    if _host_matches(host, SOCIAL_HOSTS):
        return "social"
    return "referral"


def is_bot(user_agent: str, device_family: str | None = None) -> bool:
    return device_family == "Spider" or bool(_BOT_UA.search(user_agent))


# 0-255 without leading zeros (ipaddress refuses those too).
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
# The first three octets of a dotted quad; one match in C instead of four checks in Python.
_DOTTED_QUAD = re.compile(rf"({_OCTET}\.{_OCTET}\.{_OCTET}\.){_OCTET}")


def anonymise_ip(ip: str) -> str | None:
    """IPv4 with the last octet zeroed, IPv6 cut to its /48; None when not an address."""
    ip = ip.strip()
    # Fast path for the common dotted quad; anything unusual goes through ipaddress.
    quad = _DOTTED_QUAD.fullmatch(ip)
    if quad is not None:
        return quad[1] + "0"
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    prefix = 24 if addr.version == 4 else 48
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False).network_address)


# Query parameter -> (field, is a click id).
_PARAM_TARGETS = {
    **{param: (key, False) for param, key in UTM_KEYS.items()},
    **{name: (name, True) for name in CLICK_IDS},
}
_NONE: dict[str, str] = {}


def _split(url: str) -> tuple[str | None, str]:
    """(host, query) of an absolute URL; the common case without urlsplit's generality."""
    start = url.find("://")
    if start < 0:
        return None, ""
    rest = url[start + 3 :].partition("#")[0]
    end = len(rest)
    for sep in "/?#":
        pos = rest.find(sep)
        if 0 <= pos < end:
            end = pos
    host = rest[:end].rpartition("@")[2]
    if host.startswith("["):
        try:
            return urlsplit(url).hostname or None, urlsplit(url).query
        except ValueError:
            return None, ""
    host = host.partition(":")[0].lower()
    qpos = rest.find("?", end)
    return host or None, (rest[qpos + 1 :] if qpos >= 0 else "")


def _page_params(url: str) -> tuple[str | None, dict[str, str], dict[str, str]]:
    """The page host, its campaign fields (named as UTM_KEYS says) and its click ids.

    Not cached: click ids make many URLs unique, and on the benchmark's traffic a cache
    cost more than it saved. With no parameters both dicts are one shared empty dict
    (never stored in an event).
    """
    host, raw_query = _split(url)
    if not raw_query:  # most pages
        return host, _NONE, _NONE
    campaign: dict[str, str] = {}
    click_ids: dict[str, str] = {}
    # Only the few parameters we use are decoded (parse_qs would decode them all),
    # straight into the dict each belongs to; the first value of a name wins.
    for pair in raw_query.split("&"):
        name, _, value = pair.partition("=")
        target = _PARAM_TARGETS.get(name)
        if target is None or not value:
            continue
        key, is_click_id = target
        found = click_ids if is_click_id else campaign
        if key not in found:
            found[key] = unquote_plus(value) if "%" in value or "+" in value else value
    return host, campaign or _NONE, click_ids or _NONE


@functools.lru_cache(maxsize=4096)
def _referrer_host(referrer: str) -> str | None:
    return _split(referrer)[0]


class Enricher:
    """Holds the parsers (and their bounded caches); ``enrich`` edits one event in place."""

    def __init__(self, *, geoip_path: Path | None, ua_cache_size: int, geo_cache_size: int) -> None:
        parser = ua_parser.Parser(ua_parser.BestAvailableResolver(ua_parser.load_builtins()))
        # Parsed fields and the bot verdict are cached together: both cost tens of microseconds.
        self._parse_ua: Callable[[str], tuple[dict[str, Any], bool]] = functools.lru_cache(maxsize=ua_cache_size)(
            functools.partial(self._ua_fields, parser)
        )
        self._geo_reader: Any = maxminddb.open_database(str(geoip_path)) if geoip_path else None
        self._geo: Callable[[str], dict[str, Any] | None] = functools.lru_cache(maxsize=geo_cache_size)(
            self._geo_lookup
        )

    def close(self) -> None:
        if self._geo_reader is not None:
            self._geo_reader.close()
            self._geo_reader = None

    @staticmethod
    def _ua_fields(parser: Any, user_agent: str) -> tuple[dict[str, Any], bool]:
        result = parser.parse(user_agent)
        ua, os_, device = result.user_agent, result.os, result.device
        fields = {
            "browser": {
                "family": ua.family if ua else "Other",
                "version": _version(ua.major, ua.minor, ua.patch) if ua else None,
            },
            "os": {
                "family": os_.family if os_ else "Other",
                "version": _version(os_.major, os_.minor, os_.patch) if os_ else None,
            },
            "device": {
                "family": device.family if device else "Other",
                "brand": device.brand if device else None,
                "model": device.model if device else None,
            },
        }
        return fields, is_bot(user_agent, device.family if device else None)

    def _geo_lookup(self, ip: str) -> dict[str, Any] | None:
        try:
            record = self._geo_reader.get(ip)
        except ValueError:
            return None
        if not isinstance(record, dict):
            return None
        subdivisions = record.get("subdivisions") or [{}]
        location = record.get("location") or {}
        return {
            "country": (record.get("country") or {}).get("iso_code"),
            "region": subdivisions[0].get("iso_code"),
            "city": ((record.get("city") or {}).get("names") or {}).get("en"),
            "latitude": location.get("latitude"),
            "longitude": location.get("longitude"),
            "timeZone": location.get("time_zone"),
        }

    def enrich(
        self, event: dict[str, Any], *, switches: Enrichment, header_ua: str, client_ip: str, flags: list[str]
    ) -> None:
        context: dict[str, Any] = event["context"]
        # The browser's own user agent (server SDKs forward it in context) beats the
        # HTTP header, which for server SDKs names the SDK.
        context_ua = context.get("userAgent")
        ua: str = context_ua if isinstance(context_ua, str) else header_ua
        parsed = self._parse_ua(ua) if ua and (switches.user_agent or switches.bot) else None
        if switches.user_agent and parsed is not None:
            # The cached dict itself: the event is serialised right after and never edited.
            context["userAgentParsed"] = parsed[0]
        if switches.bot:
            context["bot"] = parsed is not None and parsed[1]

        context_ip = context.get("ip")
        ip = context_ip if context_ip and isinstance(context_ip, str) else client_ip
        if switches.geo and ip and self._geo_reader is not None:
            geo = self._geo(ip)
            if geo is not None:
                context["geo"] = geo
        if switches.campaign:
            self._campaign(event, context)
        # After geo: the full address was needed for the lookup.
        if switches.ip == "remove":
            context.pop("ip", None)
        elif switches.ip == "anonymize":
            masked = anonymise_ip(ip) if ip else None
            if masked is None:
                context.pop("ip", None)
                if ip:
                    flags.append(FLAG_IP_INVALID)
            else:
                context["ip"] = masked
        elif ip and "ip" not in context:
            context["ip"] = ip

    @staticmethod
    def _campaign(event: dict[str, Any], context: dict[str, Any]) -> None:
        page_value, props_value = context.get("page"), event.get("properties")
        page: dict[str, Any] = page_value if isinstance(page_value, dict) else {}
        props: dict[str, Any] = props_value if isinstance(props_value, dict) else {}
        url = page.get("url") or props.get("url")
        referrer = page.get("referrer") or props.get("referrer")
        page_host, from_url, click_ids = _page_params(url) if isinstance(url, str) else (None, _NONE, _NONE)

        # Fields the client gave win over the URL's.
        given = context.get("campaign")
        campaign = dict(given) if isinstance(given, dict) else {}
        for key, value in from_url.items():
            campaign.setdefault(key, value)
        if campaign:
            context["campaign"] = campaign
        if click_ids:
            context["clickIds"] = click_ids
        if isinstance(referrer, str) and referrer:
            host = _referrer_host(referrer)
            if host:
                existing = context.get("referrer")
                info = dict(existing) if isinstance(existing, dict) else {}
                info.setdefault("url", referrer)
                info["host"] = host
                info["medium"] = referrer_medium(host, page_host)
                context["referrer"] = info


def _version(*parts: str | None) -> str | None:
    kept = [p for p in parts if p]
    return ".".join(kept) if kept else None
