"""Real-world JSON schemas for bench/structured.py: what factory devices, hospital integrations and agents ask
for. Strings and arrays carry the bounds such integrations set, so a complete answer fits in ``max_tokens``."""

from __future__ import annotations

S = {"type": "string", "maxLength": 40}
SHORT = {"type": "string", "maxLength": 16}
ID = {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{4}$"}
BOOL = {"type": "boolean"}


def obj(props: dict, required: list[str] | None = None, **extra) -> dict:
    return {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
        "additionalProperties": False,
        **extra,
    }


def ints(lo: int, hi: int) -> dict:
    return {"type": "integer", "minimum": lo, "maximum": hi}


def nums(lo: float, hi: float) -> dict:
    return {"type": "number", "minimum": lo, "maximum": hi}


def enum(*values) -> dict:
    return {"enum": list(values)}


def arr(items: dict, lo: int = 0, hi: int = 4) -> dict:
    return {"type": "array", "items": items, "minItems": lo, "maxItems": hi}


SCHEMAS: dict[str, dict] = {
    "maintenance_ticket": obj(
        {
            "machine": enum("press", "conveyor", "robot", "oven"),
            "line": ints(1, 12),
            "severity": enum("low", "medium", "high", "critical"),
            "stopped": BOOL,
            "summary": S,
        }
    ),
    "lab_order": obj(
        {
            "patient_id": ID,
            "tests": arr(enum("CBC", "BMP", "CMP", "LFT", "TSH", "HbA1c", "lipids"), 1, 4),
            "priority": enum("routine", "urgent", "stat"),
            "fasting": BOOL,
        }
    ),
    "sensor_reading": obj(
        {
            "sensor": SHORT,
            "unit": enum("C", "F", "bar", "rpm", "A", "V"),
            "value": nums(-50, 5000),
            "ok": BOOL,
        }
    ),
    "sensor_batch": obj({"readings": arr(obj({"sensor": SHORT, "value": nums(-50, 500)}), 1, 3)}),
    "shift_report": obj(
        {
            "shift": enum("morning", "afternoon", "night"),
            "units_produced": ints(0, 100000),
            "scrap": ints(0, 1000),
            "incidents": arr(obj({"time": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"}, "what": S}), 0, 2),
        }
    ),
    "classification": obj({"label": enum("defect", "no_defect", "unclear"), "confidence": nums(0, 1)}),
    "yes_no": obj({"answer": BOOL}),
    "sentiment": obj({"sentiment": enum("positive", "neutral", "negative")}),
    "triage": obj(
        {
            "acuity": ints(1, 5),
            "department": enum("ED", "cardiology", "neurology", "orthopedics", "general"),
            "isolation": BOOL,
            "reason": S,
        }
    ),
    "medication": obj(
        {
            "drug": SHORT,
            "dose_mg": nums(0, 5000),
            "route": enum("oral", "iv", "im", "sc", "topical"),
            "frequency": enum("once", "bid", "tid", "qid", "prn"),
        }
    ),
    "vitals": obj(
        {
            "heart_rate": ints(20, 250),
            "systolic": ints(50, 260),
            "diastolic": ints(20, 160),
            "spo2": ints(50, 100),
            "temperature_c": nums(30, 43),
        }
    ),
    "address": obj({"street": S, "city": SHORT, "postcode": {"type": "string", "pattern": "^[0-9]{5}$"}}),
    "person": obj({"name": S, "age": ints(0, 120), "email": {"type": "string", "format": "email", "maxLength": 40}}),
    "refs_order": {
        "$defs": {
            "item": obj({"sku": ID, "qty": ints(1, 99)}),
            "party": obj({"name": SHORT, "site": enum("north", "south")}),
        },
        **obj({"buyer": {"$ref": "#/$defs/party"}, "items": arr({"$ref": "#/$defs/item"}, 1, 3)}),
    },
    "one_of_event": obj(
        {
            "event": {
                "anyOf": [
                    obj({"kind": {"const": "start"}, "at": ints(0, 86400)}),
                    obj({"kind": {"const": "stop"}, "reason": enum("fault", "planned", "shortage")}),
                ]
            }
        }
    ),
    "nullable": obj({"note": {"anyOf": [SHORT, {"type": "null"}]}, "count": {"type": ["integer", "null"]}}),
    "optional_fields": obj({"machine": SHORT, "operator": SHORT, "comment": S}, required=["machine"], minProperties=1),
    "nested_3": obj({"plant": obj({"hall": obj({"line": ints(1, 9), "cell": enum("A", "B", "C")})})}),
    "matrix": obj({"rows": arr(arr(ints(0, 9), 2, 2), 2, 2)}),
    "tags": obj({"tags": arr(enum("hot", "wet", "loud", "dusty", "sharp"), 1, 3)}),
    "tool_call_weather": obj({"city": SHORT, "unit": enum("celsius", "fahrenheit")}),
    "tool_call_schedule": obj(
        {
            "machine": SHORT,
            "date": {"type": "string", "format": "date"},
            "duration_h": ints(1, 12),
            "crew": arr(SHORT, 1, 3),
        }
    ),
    "qa_answer": obj({"answer": S, "sources": arr(ints(1, 20), 0, 3)}),
    "extraction_invoice": obj(
        {
            "invoice": ID,
            "total": nums(0, 1e6),
            "currency": enum("EUR", "USD", "GBP", "CHF"),
            "lines": arr(obj({"desc": SHORT, "amount": nums(0, 1e5)}), 1, 3),
        }
    ),
    "alarm": obj(
        {
            "code": {"type": "string", "pattern": "^E[0-9]{3}$"},
            "level": ints(1, 3),
            "ack": BOOL,
        }
    ),
    "calibration": obj({"instrument": SHORT, "offset": nums(-10, 10), "gain": nums(0.5, 2), "passed": BOOL}),
    "inventory": obj({"part": ID, "on_hand": ints(0, 10000), "reorder": BOOL, "bin": SHORT}),
    "patient_summary": obj(
        {
            "patient_id": ID,
            "allergies": arr(SHORT, 0, 3),
            "conditions": arr(enum("diabetes", "hypertension", "asthma", "copd", "ckd"), 0, 3),
            "code_status": enum("full", "dnr", "dni"),
        }
    ),
    "discharge": obj({"ready": BOOL, "blockers": arr(S, 0, 2), "follow_up_days": ints(0, 90)}),
    "energy": obj({"meter": SHORT, "kwh": nums(0, 1e6), "peak_kw": nums(0, 1e4), "period": enum("day", "week")}),
    "quality_check": obj(
        {
            "batch": ID,
            "samples": ints(1, 50),
            "defects": ints(0, 50),
            "verdict": enum("accept", "rework", "reject"),
        }
    ),
    "robot_pose": obj({"x": nums(-2, 2), "y": nums(-2, 2), "z": nums(0, 2), "gripper": enum("open", "closed")}),
    "plc_write": obj({"register": ints(0, 65535), "value": ints(0, 65535), "confirm": BOOL}),
    "summary_bullets": obj({"bullets": arr(S, 1, 3)}),
    "translation": obj({"lang": enum("de", "fr", "es", "it"), "text": S}),
    "rating": obj({"score": ints(1, 10), "would_recommend": BOOL}),
}
