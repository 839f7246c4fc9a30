"""Write the worked example shortlist to examples/ (Parquet plus a readable JSONL of the same rows).

Six enterprise-search queries, each with the candidates a hybrid first stage returned, their first-stage
scores and ranks, graded relevance labels (2 = answers the question, 1 = partially, 0 = not relevant) and a
pass-through `source` column. Query q1 is the renewal example from the project's seed text. Hand-written,
so the output is the same on every run.

    python -m scripts.make_example [OUT_DIR]        # default: examples/
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import polars as pl

SCHEMA = {
    "query_id": pl.String,
    "query": pl.String,
    "doc_id": pl.String,
    "doc": pl.String,
    "first_stage_score": pl.Float64,
    "first_stage_rank": pl.Int32,
    "label": pl.Int32,
    "source": pl.String,
}

# (query_id, query, [(doc_id, first_stage_score, label, source, passage), ...]) with candidates listed in
# first-stage order (score descending); first_stage_rank is the position in that list.
QUERIES: list[tuple[str, str, list[tuple[str, float, int, str, str]]]] = [
    (
        "q1",
        "Which contracts expiring next quarter require CFO approval for renewal?",
        [
            ("D1", 0.88, 0, "sharepoint",
             "Renewal checklist: confirm the contract owner, check the expiry date and the notice period, and "
             "loop in finance before signing. Finance note: larger renewals may need sign-off above the "
             "department head."),
            ("D3", 0.85, 0, "bi-dashboard",
             "Contract expiry report, Q3: 42 vendor and customer contracts expire between 1 July and 30 "
             "September, listed by owner, region and annual value. Approval status is not tracked in this "
             "report."),
            ("D2", 0.83, 2, "policy-portal",
             "Enterprise renewals with an annual contract value above EUR 250,000 require written approval "
             "from the CFO before the renewal is signed; renewals below the threshold are approved by the "
             "regional finance director."),
            ("D5", 0.80, 0, "confluence",
             "Exception memo: during the ERP migration some renewals and amendments may be processed "
             "manually. Contact the deal desk if a renewal looks unusual."),
            ("D4", 0.79, 0, "policy-portal",
             "Procurement approval policy for new deals: purchases above EUR 50,000 need two quotes and "
             "approval from procurement and the budget holder before a purchase order is raised."),
        ],
    ),
    (
        "q2",
        "What is the refund window for EMEA enterprise customers?",
        [
            ("D1", 0.91, 0, "policy-portal",
             "Refund policy (North America): customers may request a full refund within 30 days of the "
             "invoice date; after that, credits are issued against the next invoice."),
            ("D2", 0.87, 2, "policy-portal",
             "Refund policy (EMEA): enterprise customers may request a refund within 14 days of the invoice "
             "date, in line with local consumer law; refunds are paid to the original payment method."),
            ("D3", 0.82, 0, "zendesk",
             "Macro: how to issue a refund in the billing console. Select the invoice, choose Refund, enter "
             "the amount and a reason code, then confirm."),
            ("D4", 0.78, 1, "confluence",
             "EMEA finance FAQ: refunds for annual plans are prorated after the first month; contact billing "
             "operations for exceptions."),
            ("D5", 0.71, 0, "confluence",
             "Chargeback handling: when a customer disputes a card payment, billing operations has 7 days to "
             "submit evidence to the card network."),
            ("D6", 0.66, 0, "zendesk",
             "Customer asked about a refund for a duplicate charge; resolved by voiding the second "
             "invoice."),
        ],
    ),
    (
        "q3",
        "How do I fail over the primary Postgres database during an incident?",
        [
            ("D1", 0.93, 2, "runbooks",
             "Runbook: Postgres primary failover. Confirm the primary is unhealthy, promote the synchronous "
             "replica with `patronictl failover`, then verify the application reconnects through the "
             "pgbouncer endpoint."),
            ("D2", 0.90, 0, "runbooks",
             "Runbook: Redis failover. If the Redis primary stops responding, Sentinel promotes a replica "
             "automatically; check the sentinel logs to confirm."),
            ("D3", 0.86, 1, "postmortems",
             "Postmortem 2023-11-02: the Postgres primary ran out of disk; failover to the replica took 14 "
             "minutes because the promote command was run on the wrong host."),
            ("D4", 0.81, 0, "confluence",
             "Database backup schedule: full Postgres backups run nightly at 02:00 UTC and WAL archives are "
             "shipped every five minutes to object storage."),
            ("D5", 0.74, 0, "runbooks",
             "Incident commander checklist: declare the incident, open a bridge, assign a scribe and post "
             "status updates every 30 minutes."),
        ],
    ),
    (
        "q4",
        "How do I configure SAML single sign-on with Okta?",
        [
            ("D1", 0.89, 0, "docs-site",
             "Single sign-on overview: the product supports SAML 2.0 and OpenID Connect identity providers. "
             "SSO is available on the Enterprise plan."),
            ("D2", 0.88, 0, "docs-site",
             "Configure OpenID Connect with Azure AD: register an application in Azure, copy the client ID "
             "and secret, and paste them into Settings > Authentication."),
            ("D3", 0.84, 2, "docs-site",
             "Configure SAML with Okta: create a SAML 2.0 app in the Okta admin console, set the ACS URL to "
             "https://app.example.com/saml/acs, then upload the Okta metadata XML under Settings > "
             "Authentication."),
            ("D4", 0.80, 0, "zendesk",
             "Ticket: user cannot log in after password reset; resolved by clearing the cached session "
             "cookie."),
            ("D5", 0.77, 1, "docs-site",
             "SCIM provisioning with Okta: after SSO is configured, enable SCIM in Okta to create and "
             "deactivate users automatically."),
            ("D6", 0.73, 1, "confluence",
             "Troubleshooting SAML: a 'signature invalid' error usually means the IdP certificate was rotated; "
             "download the new Okta metadata and upload it again."),
            ("D7", 0.69, 0, "docs-site",
             "Two-factor authentication: users can enrol an authenticator app or a hardware key from their "
             "profile page."),
        ],
    ),
    (
        "q5",
        "How long do we keep recordings of support calls in APAC?",
        [
            ("D1", 0.86, 0, "policy-portal",
             "Data retention policy: application logs are kept for 90 days and database backups for 35 days, "
             "after which they are deleted automatically."),
            ("D2", 0.83, 0, "policy-portal",
             "Customer data deletion: when a contract ends, customer content is deleted within 30 days of the "
             "termination date."),
            ("D3", 0.79, 0, "confluence",
             "APAC support hours: the Singapore and Sydney teams cover 08:00 to 20:00 local time on business "
             "days."),
            ("D4", 0.75, 0, "zendesk",
             "Call quality checklist: record the call only after the customer has agreed, and tag the ticket "
             "with the call ID."),
        ],
    ),
    (
        "q6",
        "Who do I escalate to if the on-call engineer does not acknowledge a page?",
        [
            ("D1", 0.92, 0, "confluence",
             "On-call schedule: primary and secondary on-call rotate weekly on Mondays at 10:00 local time; "
             "swaps are arranged in the scheduling tool."),
            ("D2", 0.90, 1, "runbooks",
             "Paging basics: pages are sent by the alerting tool to the primary on-call; acknowledge within "
             "5 minutes to stop the page repeating."),
            ("D3", 0.88, 2, "runbooks",
             "Escalation policy: if the primary on-call does not acknowledge within 10 minutes, the page "
             "escalates to the secondary on-call, then after a further 10 minutes to the engineering manager "
             "on duty."),
            ("D4", 0.85, 0, "confluence",
             "Customer escalation path: enterprise customers escalate through their account manager to the "
             "support director."),
            ("D5", 0.81, 0, "postmortems",
             "Postmortem: a missed page during a holiday weekend; the secondary rotation was empty because of "
             "an expired schedule override."),
            ("D6", 0.78, 0, "confluence",
             "On-call compensation: engineers receive a weekly stipend for each on-call week plus time off in "
             "lieu for pages handled outside business hours."),
            ("D7", 0.72, 1, "runbooks",
             "Incident severity levels: SEV1 incidents page the incident commander and the engineering "
             "manager on duty immediately."),
            ("D8", 0.70, 0, "zendesk",
             "Ticket: customer reports not receiving SMS notifications; the phone number was missing the "
             "country code."),
        ],
    ),
]


def build_frame() -> pl.DataFrame:
    """The example shortlist, one row per (query, candidate), in first-stage order."""
    rows = []
    for query_id, query, candidates in QUERIES:
        for rank, (doc_id, score, label, source, passage) in enumerate(candidates, start=1):
            rows.append({
                "query_id": query_id, "query": query, "doc_id": doc_id, "doc": passage,
                "first_stage_score": score, "first_stage_rank": rank, "label": label, "source": source,
            })
    return pl.DataFrame(rows, schema=SCHEMA)


def _replace(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)


def write_example(out_dir: str | Path) -> tuple[Path, Path]:
    """Write renewal_shortlist.parquet and renewal_shortlist.jsonl (same rows) into out_dir, atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df = build_frame()
    parquet = out / "renewal_shortlist.parquet"
    jsonl = out / "renewal_shortlist.jsonl"
    tmp = parquet.with_name(f".{parquet.name}.tmp-{os.getpid()}")
    df.write_parquet(tmp, statistics=False)
    _replace(tmp, parquet)
    tmp = jsonl.with_name(f".{jsonl.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        for row in df.iter_rows(named=True):
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    _replace(tmp, jsonl)
    return parquet, jsonl


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default=str(Path(__file__).resolve().parents[1] / "examples"))
    args = parser.parse_args(argv)
    for path in write_example(args.out_dir):
        print(path)


if __name__ == "__main__":
    main()
